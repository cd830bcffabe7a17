"""The ways users start megaring: a Hydra sweep, the deepspeed launcher, slurm, and the plot tool.

Every case runs the real command in subprocesses on CPU (gloo; tiny model, mock data, seq_len 64,
3 steps). One Hydra multirun over two layouts (cp=1 on one process, cp=2 self-spawned on two) is
made once per module; its runs are the references the launched runs must reproduce.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megaring.train.metrics import read_metrics
from tests.helpers.cli import ROOT, clean_env, losses, ok
from tests.helpers.pool import free_port
from tests.helpers.train_cfg import TINY_RUN, launcher_params

pytestmark = pytest.mark.slow

RUN = [o for o in TINY_RUN if not o.startswith("parallel.timeout_s")] + ["parallel.timeout_s=60"]
CP2 = [*RUN, "parallel.cp=2"]
BIN = Path(sys.executable).parent
FAKE_SRUN = """#!/usr/bin/env bash
# slurm's srun on one machine: $SLURM_NTASKS copies of the command with SLURM_PROCID/SLURM_LOCALID set.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def assert_same_losses(run_dir: Path, ref_dir: Path, rel: float) -> None:
    got, ref = losses(run_dir), losses(ref_dir)
    assert [s for s, _, _ in got] == [s for s, _, _ in ref] == [1, 2, 3]
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(got, ref, strict=True):
        assert loss == pytest.approx(ref_loss, rel=rel), step
        assert norm == pytest.approx(ref_norm, rel=rel), step


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[int, Path]:
    """``megaring-train -m parallel.cp=1,2 parallel.nproc_per_node=auto ...``: the run directory per cp."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "-m", "megaring.train", "-m", *RUN, "parallel.cp=1,2", "parallel.nproc_per_node=auto",
           "logging.wandb.mode=offline", f"hydra.sweep.dir={sweep_dir}"]
    ok(run(cmd, clean_env(), timeout=400))
    runs = {run_config(d.parent)["parallel"]["cp"]: d.parent for d in sweep_dir.glob("*/metrics.jsonl")}
    assert sorted(runs) == [1, 2], list(sweep_dir.iterdir())
    return runs


def test_multirun_over_two_layouts_gives_one_comparable_set(sweep):
    assert_same_losses(sweep[2], sweep[1], rel=1e-4)  # ring attention over two ranks == one process
    groups = []
    for run_dir in sweep.values():
        (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        groups.append(set(re.findall(rb"exp-[0-9a-f]{10}", wandb_file.read_bytes())))
    assert groups[0] == groups[1] and len(groups[0]) == 1  # one wandb group for the whole sweep


def test_deepspeed_launcher_on_cpu(sweep, tmp_path):
    """``launch/deepspeed.sh`` = ``deepspeed --num_accelerators 2 --module megaring.train ...``, with cp=2
    as a Ulysses pair (head all-to-all) against the sweep's ring pair."""
    env = clean_env(NUM_ACCELERATORS="2", MASTER_PORT=str(free_port()),
                    DEEPSPEED=shutil.which("deepspeed", path=str(BIN)) or "deepspeed")
    ok(run(["bash", "launch/deepspeed.sh", *CP2, "parallel.ulysses=2", f"hydra.run.dir={tmp_path}"], env))
    assert run_config(tmp_path)["parallel"]["cp"] == 2 and run_config(tmp_path)["parallel"]["ulysses"] == 2
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["mesh"] == {"dp": 1, "cp": 2, "ulysses": 2, "tp": 1}
    assert_same_losses(tmp_path, sweep[2], rel=1e-5)  # another attention order than the ring's


def test_launch_scripts_parse():
    for script in [*sorted((ROOT / "launch").glob("*.sh")), ROOT / "launch" / "slurm.sbatch"]:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.fixture(scope="module")
def fake_slurm_bin(tmp_path_factory) -> Path:
    """A directory holding the stand-in ``srun``."""
    fake_bin = tmp_path_factory.mktemp("fake_slurm")
    (fake_bin / "srun").write_text(FAKE_SRUN)
    (fake_bin / "srun").chmod(0o755)
    return fake_bin


@pytest.mark.parametrize("mode", ["task", "torchrun"])
def test_slurm_sbatch_with_a_faked_two_task_job(mode, sweep, fake_slurm_bin, tmp_path):
    """``launch/slurm.sbatch`` under the variables slurm sets, with a stand-in ``srun`` on this machine.

    ``task``: two slurm tasks, ranks from SLURM_PROCID. ``torchrun``: one task per node running
    torchrun for two processes; the SLURM_PROCID that every process inherits must not be taken as its rank.
    """
    port = free_port()
    tasks = "2" if mode == "task" else "1"
    env = clean_env(PATH=f"{fake_slurm_bin}:{clean_env()['PATH']}", MODE=mode, PYTHON=sys.executable,
                    SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_NTASKS=tasks, SLURM_JOB_NODELIST="localhost",
                    GPUS_PER_NODE="2", MASTER_PORT=str(port))
    run_dir = tmp_path / "run"
    proc = run(["bash", "launch/slurm.sbatch", *CP2, f"hydra.run.dir={run_dir}"], env)
    ok(proc)
    assert f"megaring: mode={mode} nodes=1 tasks={tasks} master=localhost:{port}" in proc.stdout
    assert_same_losses(run_dir, sweep[2], rel=1e-6)


def test_slurm_launcher_config_composes(fake_slurm_bin, monkeypatch):
    env = clean_env()
    job = run([sys.executable, "-m", "megaring.train", "--cfg", "job", "hydra/launcher=slurm", "parallel.cp=4"], env)
    ok(job)
    assert yaml.safe_load(job.stdout)["parallel"]["cp"] == 4
    launcher = launcher_params("hydra/launcher=slurm", "parallel.cp=4", "parallel.dp=4")  # resolved per job
    assert launcher["_target_"] == "hydra_plugins.megaring_slurm.launcher.MegaringSlurmLauncher"
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (8, 8, 2)
    monkeypatch.setenv("PATH", f"{fake_slurm_bin}:{clean_env()['PATH']}")  # submitit looks for srun
    assert_submitit_accepts(launcher)


def assert_submitit_accepts(launcher: dict) -> None:
    """The launcher's parameters, as MegaringSlurmLauncher hands them over, are parameters submitit's slurm knows."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    from megaring.ops.slurm_launcher import INIT_KEYS, OWN_KEYS

    params = {k: v for k, v in launcher.items() if k not in ("_target_", *INIT_KEYS, *OWN_KEYS) and v is not None}
    executor = SlurmExecutor(folder="unused")
    executor.update_parameters(**executor._convert_parameters(params))  # raises on unknown
    sbatch = _make_sbatch_string(command="megaring-train", folder="unused", **executor.parameters)
    for line in ("#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=2"):
        assert line in sbatch, sbatch


def test_plot_tool_on_two_runs(sweep, tmp_path):
    from tools import plot_runs

    written = plot_runs.main([str(sweep[1].parent), "--out", str(tmp_path)])
    assert [p.name for p in written] == ["loss.png", "scaling.png"]
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = json.loads((tmp_path / "runs.json").read_text())
    assert [(r["cp"], r["world_size"], r["steps"]) for r in rows] == [(1, 1, 3), (2, 2, 3)]
    for row in rows:
        metrics = read_metrics(Path(row["path"]) / "metrics.jsonl")
        assert row["final_loss"] == metrics[-1]["loss"]
        steady = sorted(m["tokens_per_s"] for m in metrics[1:])  # the first step is warm-up
        assert row["tokens_per_s"] == pytest.approx(sum(steady) / 2)


def test_bad_config_is_one_message_and_exit_code_2(tmp_path):
    cmd = [sys.executable, "-m", "megaring.train", *RUN, "parallel.dp=3", "parallel.nproc_per_node=2",
           f"hydra.run.dir={tmp_path}"]
    proc = run(cmd, clean_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "megaring-train: invalid training config (2 problems):" in proc.stderr
    assert "does not match the world size 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
