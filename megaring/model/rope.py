"""Rotary position embeddings from explicit positions, with Hugging Face's frequency-scaling variants.

Positions come from the data: global positions of this rank's (zigzag) shard, restarting at
document boundaries for packed samples. The rotate-half convention of Hugging Face Llama is
used, so q/k weights map to a ``LlamaForCausalLM`` without permutation::

    inv_freq_j = theta^(-2j / D),  angle_{p,j} = p * inv_freq_j,  j < D/2
    rope(x)_p  = a * (x_p * cos(angle_p) + rotate_half(x_p) * sin(angle_p))
    rotate_half([x1, x2]) = [-x2, x1]

The variants (``RopeSettings.rope_type``) change ``inv_freq`` and the attention factor ``a``
(1 except for yarn), with the formulas of transformers' ``modeling_rope_utils``:

- ``default``: as above.
- ``linear``: ``inv_freq / factor`` (position interpolation).
- ``dynamic`` (NTK): ``theta' = theta * (factor * L / L_max - (factor - 1))^(D / (D - 2))`` with
  ``L = max(seq_len, L_max)``; ``seq_len`` is the max position + 1 of the whole (global) batch,
  not of this rank's shard, so every cp rank uses the same frequencies. This is what a fresh
  transformers model computes for that batch (transformers also caches across calls).
- ``llama3``: low frequencies (wavelength > L_orig / low_freq_factor) divided by ``factor``,
  high ones (wavelength < L_orig / high_freq_factor) kept, a smooth blend in between.
- ``yarn``: a ramp between interpolated and extrapolated frequencies over the dims whose
  rotation counts lie between ``beta_slow`` and ``beta_fast``; ``a = 0.1 ln(factor) + 1``
  (or from ``mscale`` / ``mscale_all_dim``, or the given ``attention_factor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_PARAMETER_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                       "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


@dataclass(frozen=True)
class RopeSettings:
    """Everything the rotary tables depend on besides the positions."""

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    max_position_embeddings: int = 8192
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_config(cls, cfg) -> RopeSettings:
        """From a :class:`~megaring.model.config.ModelConfig` (``rope_theta``, ``rope_scaling``, sizes)."""
        scaling = dict(cfg.rope_scaling or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        params = {k: scaling[k] for k in ROPE_PARAMETER_KEYS if scaling.get(k) is not None}
        if rope_type in ("llama3", "yarn"):
            params.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
        return cls(head_dim=cfg.head_dim, theta=float(cfg.rope_theta), rope_type=rope_type,
                   max_position_embeddings=cfg.max_position_embeddings, **params)

    @property
    def depends_on_seq_len(self) -> bool:
        return self.rope_type == "dynamic"


def _default_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (D/2,)


def _dynamic_inv_freq(rope: RopeSettings, seq_len: int | None) -> torch.Tensor:
    dim, max_len = rope.head_dim, rope.max_position_embeddings
    if seq_len is None or seq_len <= max_len:
        return _default_inv_freq(rope.theta, dim)
    # float32 tensor arithmetic, as transformers does on the batch's (tensor) sequence length
    length = torch.tensor(seq_len, dtype=torch.int64)
    theta = rope.theta * ((rope.factor * length / max_len) - (rope.factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(theta, dim)


def _llama3_inv_freq(rope: RopeSettings) -> torch.Tensor:
    inv_freq = _default_inv_freq(rope.theta, rope.head_dim)
    old_len, low, high = rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeSettings) -> tuple[torch.Tensor, float]:
    dim, base, old_len = rope.head_dim, rope.theta, rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else rope.max_position_embeddings / old_len
    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = float(_yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (D/2,)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def inv_freq_and_scale(rope: RopeSettings, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq (D/2,), attention factor)`` on the CPU in float32. ``seq_len`` matters for ``dynamic`` only."""
    kind = rope.rope_type
    if kind == "default":
        return _default_inv_freq(rope.theta, rope.head_dim), 1.0
    if kind == "linear":
        return _default_inv_freq(rope.theta, rope.head_dim) / rope.factor, 1.0
    if kind == "dynamic":
        return _dynamic_inv_freq(rope, seq_len), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(rope), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rope)
    raise ValueError(f"unknown rope_type {kind!r} (expected default, linear, dynamic, llama3 or yarn)")


def rope_cos_sin(
    positions: torch.Tensor, rope: RopeSettings, dtype: torch.dtype, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(B, S, 1, head_dim)`` for ``positions`` ``(B, S)``, computed in float32.

    ``seq_len``: the max position + 1 over the global batch (``dynamic`` only; ignored otherwise).
    """
    inv_freq, scale = inv_freq_and_scale(rope, seq_len)
    inv_freq = inv_freq.to(positions.device)  # (D/2,)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, S, D/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # (B, S, 1, D)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, D)`` by the tables of :func:`rope_cos_sin`."""
    return x * cos + rotate_half(x) * sin
