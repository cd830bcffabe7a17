"""``megaring-train``: the Hydra entry point (``python -m megaring.train`` too).

The composed config is converted once to :class:`~megaring.train.config.TrainConfig`; the run
directory is Hydra's output directory (``hydra.run.dir=...`` to choose it).

Nothing is written into a run directory before its lock is held: :class:`RunDirCheck` (a Hydra
callback, before Hydra creates the directory) refuses a ``hydra.run.dir`` that names a file or
cannot be written, with exit status 2; Hydra itself writes no ``.hydra/`` (``hydra.output_subdir:
null`` in configs/config.yaml), and global rank 0 writes the same files (:func:`hydra_files`) once it
holds the run's locks (:func:`megaring.checkpoint.rundir.write_hydra_files`).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from megaring.checkpoint.rundir import unwritable, write_problem
from megaring.config_dir import CONFIG_DIR
from megaring.ops.spawn import WorkerFailed, launch
from megaring.train.config import command_line_problems, register_configs, to_train_config
from megaring.train.config_checks import ConfigError

register_configs()

LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(=(\d+))?$")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` (the deepspeed launcher's); export LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        match = LOCAL_RANK_ARG.match(argv[i])
        if match is None:
            out.append(argv[i])
            i += 1
            continue
        value = match.group(2)
        if value is None and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        if value is not None:
            os.environ.setdefault("LOCAL_RANK", value)
        i += 1
    return out


class RunDirCheck(Callback):
    """Before Hydra creates the run directory: it is a directory (or can be made one) that can be
    written; else one line naming it and exit status 2 (Hydra would fail with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # hydra.run.dir interpolates ${hydra:...}
        problem = run_dir_problem(Path(str(config.hydra.run.dir)))
        if problem:
            print(f"megaring: {problem}", file=sys.stderr)
            sys.exit(2)


def run_dir_problem(run_dir: Path) -> str | None:
    if run_dir.exists() and not run_dir.is_dir():
        return (f"hydra.run.dir={run_dir} names a file, not a directory: choose a directory (a new one starts a "
                "new run)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return unwritable("run directory", run_dir, err, "hydra.run.dir")
    return write_problem(run_dir, "run directory", "hydra.run.dir")


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """The files Hydra writes into ``<run dir>/.hydra`` when ``hydra.output_subdir`` is set: the job's
    config, Hydra's own and the command line's overrides."""
    hydra_cfg = HydraConfig.instance().cfg
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


def refuse_unknown_keys(prog: str, args: list[str]) -> None:
    """Exit 2 naming every command-line key the schema does not have, before Hydra composes
    (``+`` or not: a typo never trains with the defaults)."""
    problems = command_line_problems(args)
    if problems:
        print(f"{prog}: {ConfigError.listing(problems)}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        train_cfg = to_train_config(cfg, hydra_cfg.overrides.task)
    except ConfigError as err:  # the user's to fix: the message, not a traceback
        print(f"megaring-train: {err}", file=sys.stderr)
        sys.exit(2)
    launch_or_exit("megaring-train", train_cfg, Path(hydra_cfg.runtime.output_dir), hydra_files(cfg))


def launch_or_exit(prog: str, cfg, run_dir: Path, files, job=None) -> None:
    """Start the workers (:func:`megaring.ops.spawn.launch`); a config problem found there exits with
    status 2, a failed worker with 1, and a worker's own exit status (preemption, guards) is passed on."""
    try:
        status = launch(cfg, run_dir, files, job=job)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(2)
    except WorkerFailed as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(1)
    if status:
        sys.exit(status)


def main() -> None:
    sys.argv = strip_launcher_args(sys.argv)
    refuse_unknown_keys("megaring-train", sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
