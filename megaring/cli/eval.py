"""``megaring-eval``: long-context evaluation of a model at any layout, on the training mesh.

    megaring-eval checkpoint=<run dir | checkpoints dir | step dir> [step=N] tasks=[passkey,needle,position_loss] \\
        parallel.cp=4 parallel.nproc_per_node=auto [model.rope_scaling=...] [eval_tasks.passkey.lengths=[...]]
    megaring-eval model.init_from=<Hugging Face dir> tasks=[passkey] ...

The model is a run's checkpoint (its layout-independent state: any layout and ZeRO stage wrote it),
a Hugging Face directory, or neither (the seed's weights: a baseline). Every other key is the
training config's (``parallel.*``, ``data.*``, ``trainer.seq_len`` for ``position_loss``,
``eval_tasks.<task>.*``); ``model.rope_theta`` / ``model.rope_scaling`` / ``model.max_position_embeddings``
change the checkpoint's RoPE without training. The run directory (default ``runs/eval/<overrides>``,
``hydra.run.dir=`` to choose) receives ``eval.jsonl``, ``eval.png`` and, with ``save_cases``,
``cases/<task>.jsonl``; the table is printed at the end (:mod:`megaring.retrieval.report`).
Bad input exits with status 2 and one message listing every problem, before any process starts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from megaring.cli.train import hydra_files, launch_or_exit, refuse_unknown_keys, strip_launcher_args
from megaring.config_dir import CONFIG_DIR
from megaring.errors import BadInput, ConfigError
from megaring.train.config import register_configs, run_name, to_train_config

register_configs()

PROG = "megaring-eval"
DEFAULT_TASKS = ("passkey",)
OWN_KEYS = ("checkpoint", "step", "tasks")  # megaring-eval's keys; the rest are the training config's


@dataclass
class EvalArgs:
    """``checkpoint=``, ``step=`` and ``tasks=``, taken off the command line by :func:`main`."""

    checkpoint: str | None = None
    step: int | None = None
    tasks: tuple[str, ...] = DEFAULT_TASKS


ARGS = EvalArgs()  # this command's (Hydra's main takes no arguments of ours)


def split_args(args: list[str]) -> tuple[EvalArgs, list[str]]:
    """(megaring-eval's own keys, the training config's overrides); bad values exit with status 2."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    own, rest, problems = EvalArgs(), [], []
    parser = OverridesParser.create()
    for arg in args:
        key = arg.split("=", 1)[0]
        if key not in OWN_KEYS or "=" not in arg:
            rest.append(arg)
            continue
        try:
            value = parser.parse_override(arg).value()
        except HydraException as err:
            problems.append(f"{arg}: {err}")
            continue
        if key == "checkpoint":
            own.checkpoint = str(value)
        elif key == "step":
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"step={value!r} must be a step number")
            else:
                own.step = value
        else:
            names = value if isinstance(value, list) else [value]
            own.tasks = tuple(str(t) for t in names)
    if problems:
        print(f"{PROG}: {ConfigError.listing(problems)}", file=sys.stderr)
        sys.exit(2)
    return own, rest


def default_run_dir(args: list[str]) -> str:
    """``runs/eval/<the command's overrides>``: one directory per command (its own keys included), so
    evaluations of two checkpoints never share one; re-running a command rewrites its own report."""
    named = [a for a in args if "=" in a and not a.startswith("-")]
    return "runs/eval/" + run_name(named).replace("'", "_").replace("\\", "_")


def checkpoint_step_dir(own: EvalArgs, init_from: str | None) -> Path | None:
    """The step directory ``checkpoint=`` (``step=``) names, or None; :class:`BadInput` otherwise."""
    from megaring.cli.export import ExportError, find_checkpoint

    if own.checkpoint is None:
        if own.step is not None:
            raise ConfigError.listing(["step= picks a step of checkpoint=<run dir>: give checkpoint= too"])
        return None
    if init_from:
        raise ConfigError.listing([f"checkpoint={own.checkpoint} and model.init_from={init_from} both name the "
                                   "model: give one"])
    source = Path(own.checkpoint)
    if not source.exists():
        raise ConfigError.listing([f"checkpoint={own.checkpoint} does not exist"])
    try:
        return find_checkpoint(source.resolve(), own.step)
    except ExportError as err:
        raise ConfigError.listing([f"checkpoint={own.checkpoint}: {err}"]) from None


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from megaring.checkpoint.universal import UniversalState
    from megaring.retrieval.job import EvalJob, eval_problems
    from megaring.train.config import pretrained_model_config

    hydra_cfg = HydraConfig.get()
    own = ARGS
    try:
        train_cfg = to_train_config(cfg, hydra_cfg.overrides.task)
        train_cfg.trainer.max_steps = 0  # nothing trained, nothing saved
        step_dir = checkpoint_step_dir(own, train_cfg.model.init_from)
        if step_dir is not None:
            base = UniversalState(step_dir).model_config
            train_cfg.model = pretrained_model_config(train_cfg.model, hydra_cfg.overrides.task, base=base)
        problems = eval_problems(train_cfg, train_cfg.parallel.dims().world_size, list(own.tasks))
        if problems:
            raise ConfigError.listing(problems)
    except BadInput as err:  # the user's to fix: the message, not a traceback
        print(f"{PROG}: {err}", file=sys.stderr)
        sys.exit(2)
    job = EvalJob(str(step_dir) if step_dir else None, tuple(own.tasks))
    launch_or_exit(PROG, train_cfg, Path(hydra_cfg.runtime.output_dir), hydra_files(cfg), job=job)


def main() -> None:
    args = strip_launcher_args(sys.argv)[1:]
    global ARGS
    ARGS, rest = split_args(args)
    refuse_unknown_keys(PROG, rest)
    if not any(a.startswith("hydra.run.dir=") for a in rest):
        rest.append(f"hydra.run.dir='{default_run_dir(args)}'")
    sys.argv = [sys.argv[0], *rest]
    hydra_main()


if __name__ == "__main__":
    main()
