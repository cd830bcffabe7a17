"""The model config (Hydra schema of the ``model`` group) and its checks against a parallel layout.

Checks are pure arithmetic, run before any communication; ``validate_model_config`` returns
every problem so the trainer can report them together with the other parts' problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megaring.errors import problem_list
from megaring.layout import length_problem


@dataclass
class ModelConfig:
    """A Llama-family decoder. ``None`` sizes are derived: ``n_kv_heads = n_heads`` and
    ``ffn_dim`` by Llama's rule (``2/3 * 4 * dim``, times ``ffn_dim_multiplier``, rounded up to
    ``multiple_of``)."""

    name: str = "tiny"
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int | None = 4
    ffn_dim: int | None = 192
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU intermediate size."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that holds ``vocab_size`` tokens (e.g. ``multiple = 128 * tp``)."""
    return multiple * math.ceil(vocab_size / multiple)


def _shape_problems(cfg: ModelConfig) -> list[str]:
    out = [f"model.{n}={getattr(cfg, n)} must be >= 1" for n in ("vocab_size", "dim", "n_layers", "n_heads")
           if getattr(cfg, n) < 1]
    if out:
        return out
    if cfg.kv_heads < 1 or cfg.n_heads % cfg.kv_heads:
        out.append(f"model.n_heads={cfg.n_heads} must be a multiple of model.n_kv_heads={cfg.kv_heads}")
    if cfg.dim % cfg.n_heads:
        out.append(f"model.dim={cfg.dim} must be divisible by model.n_heads={cfg.n_heads}")
    elif cfg.head_dim % 2:
        out.append(f"head dim {cfg.head_dim} (dim / n_heads) must be even for rotary embeddings")
    if cfg.hidden_dim < 1:
        out.append(f"model.ffn_dim={cfg.hidden_dim} must be >= 1")
    return out


def _tp_problems(cfg: ModelConfig, tp: int) -> list[str]:
    sizes = {"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.kv_heads,
             "model.vocab_size": cfg.vocab_size, "model.ffn_dim": cfg.hidden_dim}
    out = []
    for name, size in sizes.items():
        if size % tp:
            hint = f" (pad it to {padded_vocab_size(size, tp)})" if name == "model.vocab_size" else ""
            out.append(f"{name}={size} is not divisible by parallel.tp={tp}{hint}")
    return out


def _seq_problems(seq_len: int, *, tp: int, cp: int, sequence_parallel: bool, layout: str) -> list[str]:
    if (problem := length_problem(seq_len, cp, layout)) is not None:
        return [problem]
    if sequence_parallel and (seq_len // cp) % tp:
        return [f"with sequence parallelism the per-cp-rank sequence length {seq_len}/cp={seq_len // cp} "
                f"must be divisible by parallel.tp={tp}"]
    return []


def validate_model_config(
    cfg: ModelConfig,
    *,
    tp: int = 1,
    cp: int = 1,
    seq_len: int | None = None,
    sequence_parallel: bool = False,
    layout: str = "zigzag",
) -> list[str]:
    """Every problem of ``cfg`` under this layout (empty when valid). ``seq_len`` is the global one."""
    out = _shape_problems(cfg)
    if not out:
        out += _tp_problems(cfg, tp)
    if seq_len is not None:
        out += _seq_problems(seq_len, tp=tp, cp=cp, sequence_parallel=sequence_parallel, layout=layout)
    return out


def check_model_config(cfg: ModelConfig, **layout) -> None:
    """Raise one ``ValueError`` listing every problem of :func:`validate_model_config`."""
    problems = validate_model_config(cfg, **layout)
    if problems:
        raise ValueError(problem_list(f"invalid model config {cfg.name!r}", problems))
