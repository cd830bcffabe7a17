"""``megaring-plan model=125m trainer.seq_len=131072 trainer.micro_batch_size=1 devices=8 memory_gb=80``.

Key=value arguments like the trainer's: ``model=<name>`` (megaring/configs/model) or ``model.init_from=<dir>``
(a Hugging Face checkpoint), ``trainer.seq_len``, ``trainer.micro_batch_size``, ``devices``,
``memory_gb`` (per device), and optionally ``dtype_bytes`` (2), ``tflops`` (per device),
``intra_gbps`` (tp / cp links), ``inter_gbps`` (dp links), ``reserved_gb`` (per device, not for
the step: the CUDA context, or the host process on CPU, about 0.45 GiB here), ``top`` (rows shown).
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from megaring.config_dir import CONFIG_DIR
from megaring.model.config import ModelConfig
from megaring.plan.memory import Hardware
from megaring.plan.planner import describe, plan


def load_model(args: dict[str, str]) -> ModelConfig:
    if "model.init_from" in args:
        from megaring.hf import model_config_from_hf

        return model_config_from_hf(args["model.init_from"])
    schema = OmegaConf.structured(ModelConfig)
    name = args.get("model", "tiny")
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(f"{CONFIG_DIR}/model/{name}.yaml")))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(f"megaring-plan: arguments are key=value, got {bad}\n{__doc__}", file=sys.stderr)
        return 2
    args = dict(a.split("=", 1) for a in argv)
    cfg = load_model(args)
    hw = Hardware(memory_bytes=float(args.get("memory_gb", 80)) * 2**30, dtype_bytes=int(args.get("dtype_bytes", 2)),
                  tflops=float(args.get("tflops", 400)), intra_gbps=float(args.get("intra_gbps", 300)),
                  inter_gbps=float(args.get("inter_gbps", 25)),
                  reserved_bytes=float(args.get("reserved_gb", 0)) * 2**30)
    p = plan(cfg, int(args.get("trainer.seq_len", 8192)), int(args.get("trainer.micro_batch_size", 1)),
             int(args.get("devices", 1)), hw)
    print(describe(p, hw, top=int(args.get("top", 10))))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
