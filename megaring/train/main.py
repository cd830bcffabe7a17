"""``megaring-train``: the Hydra entry point (``python -m megaring.train`` too).

The composed config is converted once to :class:`~megaring.train.config.TrainConfig`; the run
directory is Hydra's output directory (``hydra.run.dir=...`` to choose it).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from megaring.config_dir import CONFIG_DIR
from megaring.train.config import command_line_problems, register_configs, to_train_config
from megaring.train.launch import WorkerFailed, launch
from megaring.train.validate import ConfigError

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
    try:
        status = launch(train_cfg, Path(hydra_cfg.runtime.output_dir))
    except ConfigError as err:
        print(f"megaring-train: {err}", file=sys.stderr)
        sys.exit(2)
    except WorkerFailed as err:
        print(f"megaring-train: {err}", file=sys.stderr)
        sys.exit(1)
    if status:
        sys.exit(status)


def main() -> None:
    sys.argv = strip_launcher_args(sys.argv)
    refuse_unknown_keys("megaring-train", sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
