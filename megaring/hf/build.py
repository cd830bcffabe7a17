"""Build a (cp, tp) model straight from a Hugging Face checkpoint directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megaring.hf.config import model_config_from_hf, override_problems
from megaring.hf.weights import load_hf_weights
from megaring.model.config import ModelConfig, check_model_config
from megaring.model.context import ParallelContext
from megaring.model.transformer import Transformer


def hf_model_config(directory: str | Path, overrides: dict | None = None) -> ModelConfig:
    """The checkpoint's config with ``overrides`` (``model.*`` keys) applied; conflicts raise one ``ValueError``."""
    cfg = model_config_from_hf(directory)
    overrides = {k.removeprefix("model."): v for k, v in (overrides or {}).items()}
    problems = override_problems(cfg, overrides)
    if problems:
        raise ValueError(f"overrides conflict with {directory}:\n  - " + "\n  - ".join(problems))
    return dataclasses.replace(cfg, **overrides)


def build_model_from_hf(
    directory: str | Path, ctx: ParallelContext, overrides: dict | None = None
) -> tuple[Transformer, ModelConfig]:
    """This rank's shards of the checkpoint's model (no random init: every weight is read)."""
    cfg = hf_model_config(directory, overrides)
    check_model_config(cfg, tp=ctx.tp.size, cp=ctx.cp.size, ulysses=ctx.cp_ulysses.size,
                       sequence_parallel=ctx.sequence_parallel, layout=ctx.layout)
    model = Transformer(cfg, ctx)
    load_hf_weights(model, ctx, directory)
    return model, cfg
