"""The model config (Hydra schema of the ``model`` group) and its checks against a parallel layout.

Checks are pure arithmetic, run before any communication; ``validate_model_config`` returns
every problem so the trainer can report them together with the other parts' problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megaring.errors import problem_list
from megaring.layout import length_problem
from megaring.ulysses.heads import head_problems

ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class ModelConfig:
    """A Llama-family decoder. ``None`` sizes are derived: ``n_kv_heads = n_heads`` and
    ``ffn_dim`` by Llama's rule (``2/3 * 4 * dim``, times ``ffn_dim_multiplier``, rounded up to
    ``multiple_of``).

    ``vocab_size`` is the real vocabulary; the model pads it internally to a multiple of tp (see
    :func:`padded_vocab_size`), full state dicts never show the padding.
    ``attention_bias`` puts biases on q, k, v and o (Llama's flag); ``qkv_bias`` on q, k, v only
    (Qwen2). ``rope_scaling``: ``None`` or ``{"rope_type": one of ROPE_TYPES, ...its parameters}``
    as in Hugging Face's ``rope_parameters`` (without ``rope_theta``). ``sliding_window``: Mistral-style
    window (a query sees the ``W`` latest keys of its document, itself included); ring attention
    computes it from document positions and stops the ring where the window ends. ``init_from``: a
    Hugging Face checkpoint directory to start from (``megaring.hf``); a tensor there that the model
    has no parameter for is an error unless ``allow_unused_weights``. ``bos_token_id`` /
    ``eos_token_id`` (an int or a list) are carried for export.

    Memory and speed (none changes a result beyond float rounding): ``loss_chunk`` tokens per chunk
    of the fused output projection + cross entropy (0: whole logits), ``mlp_chunk`` tokens per tile
    of the tiled SwiGLU (0: untiled), ``checkpoint_offload`` moves each checkpointed layer's input to
    host memory (CUDA; needs ``activation_checkpointing``), ``compile`` runs each block through
    ``torch.compile`` (eager after a compile failure). See docs/memory.md.
    """

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
    qkv_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool = False
    checkpoint_offload: bool = False
    loss_chunk: int = 0
    mlp_chunk: int = 0
    compile: bool = False
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192
    sliding_window: int | None = None
    architecture: str = "llama"
    init_from: str | None = None
    allow_unused_weights: bool = False
    bos_token_id: int | None = None
    eos_token_id: Any = None

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
    """The smallest multiple of ``multiple`` that holds ``vocab_size`` tokens (the model uses ``multiple = tp``)."""
    return multiple * math.ceil(vocab_size / multiple)


def _variant_problems(cfg: ModelConfig) -> list[str]:
    out = []
    if cfg.architecture not in ARCHITECTURES:
        out.append(f"model.architecture={cfg.architecture!r} must be one of {list(ARCHITECTURES)}")
    if cfg.rope_scaling is not None:
        rope_type = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        if rope_type not in ROPE_TYPES:
            out.append(f"model.rope_scaling.rope_type={rope_type!r} must be one of {list(ROPE_TYPES)}")
        elif rope_type != "default" and rope_type != "yarn" and "factor" not in cfg.rope_scaling:
            out.append(f"model.rope_scaling ({rope_type}) needs a 'factor'")
        if rope_type == "llama3":
            missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in cfg.rope_scaling]
            if missing:
                out.append(f"model.rope_scaling (llama3) needs {missing}")
    out += [f"model.{n}={getattr(cfg, n)} must be >= 0 tokens (0: off)" for n in ("loss_chunk", "mlp_chunk")
            if getattr(cfg, n) < 0]
    if cfg.checkpoint_offload and not cfg.activation_checkpointing:
        out.append("model.checkpoint_offload=true offloads the activation checkpoints: "
                   "it needs model.activation_checkpointing=true")
    if cfg.max_position_embeddings < 1:
        out.append(f"model.max_position_embeddings={cfg.max_position_embeddings} must be >= 1")
    return out


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
    # The vocabulary is not listed: the model pads it to a multiple of tp.
    sizes = {"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.kv_heads, "model.ffn_dim": cfg.hidden_dim}
    return [f"{name}={size} is not divisible by parallel.tp={tp}" for name, size in sizes.items() if size % tp]


def _ulysses_problems(cfg: ModelConfig, tp: int, ulysses: int) -> list[str]:
    """The heads of one tp rank split over the Ulysses group (see :mod:`megaring.ulysses.heads`)."""
    if ulysses == 1 or cfg.n_heads % tp or cfg.kv_heads % tp:
        return []  # nothing to split, or already reported by the tp checks
    where = f"model.n_heads/tp={cfg.n_heads}/{tp}" if tp > 1 else f"model.n_heads={cfg.n_heads}"
    problems = head_problems(cfg.n_heads // tp, cfg.kv_heads // tp, ulysses, where="per-tp-rank")
    return [p.replace("per-tp-rank query heads", where).replace(
        "per-tp-rank kv heads", f"model.n_kv_heads/tp={cfg.kv_heads}/{tp}" if tp > 1 else
        f"model.n_kv_heads={cfg.kv_heads}") for p in problems]


def seq_len_problems(seq_len: int, *, tp: int, cp: int, sequence_parallel: bool, layout: str) -> list[str]:
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
    ulysses: int = 1,
) -> list[str]:
    """Every problem of ``cfg`` under this layout (empty when valid). ``seq_len`` is the global one;
    ``ulysses``: the Ulysses group inside cp, which splits each tp rank's heads."""
    out = _shape_problems(cfg)
    if not out:
        out += _tp_problems(cfg, tp) + _ulysses_problems(cfg, tp, ulysses)
    out += _variant_problems(cfg)
    if seq_len is not None:
        out += seq_len_problems(seq_len, tp=tp, cp=cp, sequence_parallel=sequence_parallel, layout=layout)
        if cfg.sliding_window is not None and cfg.sliding_window < 1:
            out.append(f"model.sliding_window={cfg.sliding_window} must be >= 1 (or null: no window)")
    if ulysses > 1 and (layout == "balanced" or cfg.sliding_window is not None):
        out.append(f"parallel.ulysses={ulysses} runs the ring on its gathered zigzag/contiguous shards: it does not "
                   "combine with parallel.layout=balanced or model.sliding_window yet; use parallel.ulysses=1")
    return out


def check_model_config(cfg: ModelConfig, **layout) -> None:
    """Raise one ``ValueError`` listing every problem of :func:`validate_model_config`."""
    problems = validate_model_config(cfg, **layout)
    if problems:
        raise ValueError(problem_list(f"invalid model config {cfg.name!r}", problems))
