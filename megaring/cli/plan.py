"""``megaring-plan model=125m trainer.seq_len=131072 trainer.micro_batch_size=1 devices=8 memory_gb=80``.

Key=value arguments like the trainer's: ``model=<name>`` (megaring/configs/model) or ``model.init_from=<dir>``
(a Hugging Face checkpoint), ``trainer.seq_len``, ``trainer.micro_batch_size``, ``devices``,
``memory_gb`` (per device), and optionally ``dtype_bytes`` (2), ``tflops`` (per device),
``intra_gbps`` (tp / cp links), ``inter_gbps`` (dp links), ``reserved_gb`` (per device, not for
the step: the CUDA context, or the host process on CPU, about 0.45 GiB here), ``top`` (rows shown).
Any other key, a value of the wrong type or out of range is an error naming the key (exit 2).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from megaring.config_dir import CONFIG_DIR
from megaring.errors import closest_name, problem_list
from megaring.model.config import ModelConfig
from megaring.plan.memory import Hardware
from megaring.plan.planner import describe, plan

# key: (type, default, the bound its value must pass: ">= 1", "> 0", ...; None for names and paths).
KEYS: dict[str, tuple[type, object, str | None]] = {
    "model": (str, "tiny", None),
    "model.init_from": (str, None, None),
    "trainer.seq_len": (int, 8192, ">= 1"),
    "trainer.micro_batch_size": (int, 1, ">= 1"),
    "devices": (int, 1, ">= 1"),
    "memory_gb": (float, 80.0, "> 0"),
    "dtype_bytes": (int, 2, ">= 1"),
    "tflops": (float, 400.0, "> 0"),
    "intra_gbps": (float, 300.0, "> 0"),
    "inter_gbps": (float, 25.0, "> 0"),
    "reserved_gb": (float, 0.0, ">= 0"),
    "top": (int, 10, ">= 1"),
}


class PlanError(ValueError):
    """Arguments megaring-plan cannot plan with; the message lists every problem (exit status 2)."""


def parse_args(argv: list[str]) -> dict[str, object]:
    """Every key's value (the defaults for those not given); raises :class:`PlanError` listing all
    unknown keys (with the closest known one) and bad values (with their key)."""
    values, problems = {k: default for k, (_, default, _) in KEYS.items()}, []
    for arg in argv:
        key, eq, text = arg.partition("=")
        if not eq:
            problems.append(f"{arg!r}: arguments are key=value, e.g. devices=8")
        elif key not in KEYS:
            problems.append(f"{key} is not a megaring-plan key: did you mean {closest_name(key, KEYS)}=?")
        else:
            value, problem = _parse_value(key, text)
            values[key] = value
            problems += [problem] if problem else []
    if problems:
        raise PlanError(problem_list("megaring-plan: invalid arguments", problems)
                        + f"\nkeys: {', '.join(KEYS)} (megaring-plan --help)")
    return values


def _parse_value(key: str, text: str) -> tuple[object, str | None]:
    """``(value, None)``, or ``(None, the problem naming the key)``."""
    kind, _, bound = KEYS[key]
    if kind is str:
        return text, None
    try:
        value = kind(text)
    except ValueError:
        return None, f"{key}={text!r} must be {'an integer' if kind is int else 'a number'} {bound}"
    op, limit = bound.split()
    if not math.isfinite(value) or not (value >= float(limit) if op == ">=" else value > float(limit)):
        return None, f"{key}={text} must be {bound}"
    return value, None


def load_model(args: dict[str, object]) -> ModelConfig:
    """The model of ``model.init_from`` (a Hugging Face checkpoint) or of ``model=<name>`` (configs/model)."""
    if args.get("model.init_from"):
        from megaring.hf import model_config_from_hf

        try:
            return model_config_from_hf(args["model.init_from"])
        except (ValueError, OSError) as err:
            raise PlanError(f"megaring-plan: model.init_from={args['model.init_from']}: {err}") from None
    name, models = args.get("model", "tiny"), Path(CONFIG_DIR) / "model"
    if not (models / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in models.glob("*.yaml"))
        raise PlanError(f"megaring-plan: model={name} is not a model of configs/model: use one of {known}, "
                        "or model.init_from=<Hugging Face checkpoint directory>")
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(models / f"{name}.yaml")))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--help"], ["-h"]):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        cfg = load_model(args)
    except PlanError as err:
        print(err, file=sys.stderr)
        return 2
    hw = Hardware(memory_bytes=args["memory_gb"] * 2**30, dtype_bytes=args["dtype_bytes"], tflops=args["tflops"],
                  intra_gbps=args["intra_gbps"], inter_gbps=args["inter_gbps"],
                  reserved_bytes=args["reserved_gb"] * 2**30)
    p = plan(cfg, args["trainer.seq_len"], args["trainer.micro_batch_size"], args["devices"], hw)
    print(describe(p, hw, top=args["top"]))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
