"""Rotary position embeddings from explicit positions.

Positions come from the data: global positions of this rank's (zigzag) shard, restarting at
document boundaries for packed samples. The rotate-half convention of Hugging Face Llama is
used, so q/k weights map to a ``LlamaForCausalLM`` without permutation::

    inv_freq_j = theta^(-2j / D),  angle_{p,j} = p * inv_freq_j,  j < D/2
    rope(x)_p  = x_p * cos(angle_p) + rotate_half(x_p) * sin(angle_p)
    rotate_half([x1, x2]) = [-x2, x1]
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(B, S, 1, head_dim)`` for ``positions`` ``(B, S)``, computed in float32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / theta**exponents  # (D/2,)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, S, D/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # (B, S, 1, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, D)`` by the tables of :func:`rope_cos_sin`."""
    return x * cos + rotate_half(x) * sin
