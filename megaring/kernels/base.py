"""The block-kernel interface used by ring attention.

A block kernel attends one block of queries to one block of keys and returns the output
and the float32 log-sum-exp of each query row; its backward takes the *final* (merged)
output and log-sum-exp, so that the probabilities it recomputes are the globally
normalised ones and the block gradients simply add up. Kernels never communicate.

Shapes: q ``(B, Sq, H, D)``, k/v ``(B, Sk, H_kv, D)`` with ``H % H_kv == 0``,
out ``(B, Sq, H, D)`` in q's dtype, lse ``(B, H, Sq)`` float32, ``-inf`` for a row
that may attend to no key of the block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class BlockKernel(ABC):
    """One way of computing block attention. Subclasses are stateless."""

    name: str = ""

    def supports(self, q: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether this kernel can run these inputs (device, dtype, masking)."""
        return True

    @abstractmethod
    def forward(self, q, k, v, *, scale: float, causal: bool, mask: torch.Tensor | None):
        """Return ``(out, lse)``.

        ``causal``: the block is square and on the diagonal; query i sees keys ``j <= i``.
        ``mask``: optional ``(B, Sq, Sk)`` bool, True where attention is allowed; it is
        combined with ``causal``.
        """

    @abstractmethod
    def backward(self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: torch.Tensor | None):
        """Return ``(dq, dk, dv)`` given the final ``out`` and ``lse`` of these query rows."""


def allowed_mask(sq: int, sk: int, causal: bool, mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Combined boolean mask ``(B or 1, Sq, Sk)``, or None when everything is allowed."""
    if not causal:
        return mask
    tril = torch.ones(sq, sk, dtype=torch.bool, device=device).tril_()  # (Sq, Sk)
    return tril[None] if mask is None else mask & tril


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, Sq, Sk)`` float mask: 0 where allowed, -inf elsewhere."""
    zeros = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zeros, float("-inf")).unsqueeze(1)


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (rows that see no key anywhere) as 0: fused backward ops want finite
    values there, and those rows' probabilities are zero through the mask anyway. NaN stays NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def expand_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, S, H_kv, D) -> (B, H, S, D), repeating each kv head for its query group."""
    return x.transpose(1, 2).repeat_interleave(n_heads // x.shape[2], dim=1)


def reduce_kv_heads(dx: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, H, S, D) gradient -> (B, S, H_kv, D): sum the gradients of a query group's shared kv head."""
    b, h, s, d = dx.shape
    return dx.view(b, n_kv_heads, h // n_kv_heads, s, d).sum(2).transpose(1, 2)


def fix_empty_rows(out: torch.Tensor, lse: torch.Tensor, allowed: torch.Tensor | None):
    """Rows with no allowed key must carry lse = -inf (and out = 0) so the merge ignores them.

    Fused kernels report lse = 0 there, which the merge would read as a real block of weight 1.
    """
    if allowed is None:
        return out, lse
    empty = ~allowed.any(dim=-1)  # (B or 1, Sq); no host sync: always fill
    lse = lse.masked_fill(empty[:, None, :], float("-inf"))
    out = out.masked_fill(empty[:, :, None, None], 0.0)
    return out, lse
