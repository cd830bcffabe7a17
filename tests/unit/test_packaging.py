"""The package as users install it: a wheel, installed without ``-e`` into a fresh environment.

The wheel is built once per module from a copy of the sources (the checkout stays clean) and
installed alone (``--no-deps``) into a fresh venv. The heavy dependencies (torch, DeepSpeed, Hydra,
...) come from the test interpreter's site-packages through a ``.pth`` file of plain path lines:
those put the directories on ``sys.path`` but do not run the ``.pth`` files inside them, so the
editable megaring's finder stays out and ``import megaring`` is the wheel's copy (asserted below).
Every command runs from a directory outside the checkout, without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from megaring.data import open_dataset
from tests.helpers.cli import ROOT, clean_env, losses, ok

# What the wheel is built from, here and in docker/Dockerfile.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "megaring", "hydra_plugins")
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")


@dataclass(frozen=True)
class Installed:
    """A fresh venv holding the wheel; ``run`` starts one of its commands the way a user would."""

    wheel: Path
    venv: Path
    site_packages: Path
    env: dict[str, str]

    def run(self, command: str, *args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / command), *args], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    ok(subprocess.run([*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                       "-w", str(tmp / "wheels"), str(src)], capture_output=True, text=True, timeout=180))
    (wheel,) = (tmp / "wheels").glob("megaring-*.whl")
    return wheel


def dependency_dirs() -> list[str]:
    """The test interpreter's site-packages (torch, DeepSpeed, Hydra, ... and the editable megaring)."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def install_fresh(tmp: Path, wheel: Path) -> Installed:
    venv = tmp / "venv"
    ok(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True))
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    site_packages = Path(purelib)
    (site_packages / "megaring_test_dependencies.pth").write_text("\n".join(dependency_dirs()) + "\n")
    ok(subprocess.run([*PIP, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                      capture_output=True, text=True, timeout=180))
    env = clean_env()
    del env["PYTHONPATH"]
    # The test interpreter's bin next: DeepSpeed's JIT op is built with the first ninja on PATH, and
    # another ninja than the one that built the cached op rebuilds it (minutes on 2 cores).
    env["PATH"] = os.pathsep.join([str(venv / "bin"), os.path.dirname(sys.executable), env.get("PATH", "")])
    return Installed(wheel, venv, site_packages, env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    return install_fresh(tmp, build_wheel(tmp))


def test_wheel_holds_every_config_and_the_slurm_plugin(installed):
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "megaring" / "configs").rglob("*.yaml")}
    assert "megaring/configs/hydra/launcher/slurm.yaml" in shipped and len(shipped) > 10
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert shipped - names == set()
    assert "hydra_plugins/megaring_slurm/launcher.py" in names


# Run inside the fresh venv: where things resolve, Hydra's own plugin discovery, the slurm launcher
# config, and a user's configs directory (argv[1]) on the search path, as --config-dir puts it.
PROBE = """
import json, sys
from hydra import compose, initialize_config_dir
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
import megaring
from megaring.config_dir import CONFIG_DIR
from megaring.train.config import register_configs

register_configs()
launchers = {c.__name__: sys.modules[c.__module__].__file__ for c in Plugins.instance().discover(Launcher)}
overrides = ["hydra/launcher=slurm", "parallel.cp=2", f"hydra.searchpath=[file://{sys.argv[1]}]", "model=tiny_wide"]
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
print(json.dumps({"megaring": megaring.__file__, "config_dir": CONFIG_DIR, "launchers": launchers,
                  "target": cfg.hydra.launcher._target_, "tasks_per_node": cfg.hydra.launcher.tasks_per_node,
                  "model": [cfg.model.name, cfg.model.dim, cfg.model.n_layers]}))
"""


def test_installed_package_resolves_configs_and_discovers_the_slurm_launcher(installed, tmp_path):
    user_configs = tmp_path / "my_configs"
    shutil.copytree(ROOT / "configs", user_configs)  # as a user copies the repository's examples
    proc = installed.run("python", "-c", PROBE, str(user_configs), cwd=tmp_path)
    ok(proc)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["megaring"]).is_relative_to(installed.site_packages)
    assert Path(found["config_dir"]) == installed.site_packages / "megaring" / "configs"
    assert Path(found["launchers"]["MegaringSlurmLauncher"]).is_relative_to(installed.site_packages)
    assert found["target"] == "hydra_plugins.megaring_slurm.launcher.MegaringSlurmLauncher"
    assert found["tasks_per_node"] == 2
    assert found["model"] == ["tiny_wide", 128, 2]  # configs/model/tiny_wide.yaml on top of the shipped tiny


def test_installed_train_and_export_from_another_directory(installed, tmp_path):
    proc = installed.run("megaring-train", "model=tiny", "data=mock", "trainer.max_steps=2", "trainer.seq_len=64",
                         "trainer.global_batch_size=4", "logging.wandb.mode=disabled",
                         "logging.progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    ok(proc)
    assert [step for step, _, _ in losses(tmp_path / "run")] == [1, 2]
    assert os.listdir(tmp_path) == ["run"]  # nothing written outside the run directory
    proc = installed.run("megaring-export", f"input={tmp_path / 'run'}", f"output={tmp_path / 'hf'}", cwd=tmp_path)
    ok(proc)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 256)
    assert list((tmp_path / "hf").glob("*.safetensors"))


def test_installed_preprocess_from_another_directory(installed, tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    text = "".join(" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}\n" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    proc = installed.run("megaring-preprocess", "input=corpus.txt", "output=store", "workers=0",
                         "tokenizer.vocab_size=300", cwd=tmp_path)
    ok(proc)
    store = open_dataset(tmp_path / "store")
    assert store.num_documents == 1 and store.text(0) == text
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "store"]


def test_dockerfile_builds_and_installs_the_wheel():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert not re.search(r"pip install[^\n]* -e\b", dockerfile)
    copied = re.findall(r"^COPY (.+) (\S+)$", dockerfile, flags=re.M)
    for sources, _ in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), f"docker/Dockerfile copies {source}, which the repository lacks"
    wheel_sources = {s for sources, dest in copied if dest.startswith("/tmp/megaring-src") for s in sources.split()}
    assert wheel_sources == set(WHEEL_SOURCES)
    assert re.search(r"pip wheel [^\n]*/tmp/megaring-src", dockerfile)
    assert re.search(r'pip install "\$\(ls /tmp/wheels/megaring-\*\.whl\)', dockerfile)
