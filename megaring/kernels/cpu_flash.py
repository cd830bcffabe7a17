"""torch's fused CPU flash-attention op (``aten._scaled_dot_product_flash_attention_for_cpu``).

It takes ``(B, H, S, D)`` tensors, handles GQA natively, returns the float32 log-sum-exp,
and accepts an additive float mask (not a boolean one). For a query row with no allowed
key it returns out 0 and lse 0, which :func:`fix_empty_rows` turns into lse -inf; it does the
same for a query row holding NaN, which :func:`nan_query_rows` turns back into NaN.
"""

from __future__ import annotations

import torch

from megaring.kernels.base import BlockKernel, additive_mask, allowed_mask, finite_lse, fix_empty_rows

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D), a view


def nan_query_rows(q, out, lse):
    """The op returns out 0 and lse 0 for a query row holding NaN (as for a row without keys): a
    silent zero. Make such rows (and rows holding inf) NaN, as attention computes them, so the NaN
    reaches the outputs.
    q, out: (B, Sq, H, D); lse: (B, H, Sq)."""
    suspect = lse == 0  # (B, H, Sq): such rows report exactly 0 (a real row almost never does)
    if not suspect.any():  # a CPU kernel: reading the flag costs no device sync
        return out, lse
    bad = suspect.transpose(1, 2) & ~torch.isfinite(q.sum(dim=-1, dtype=torch.float32))  # (B, Sq, H)
    return out.masked_fill(bad[..., None], float("nan")), lse.masked_fill(bad.transpose(1, 2), float("nan"))


class CpuFlashKernel(BlockKernel):
    name = "cpu_flash"

    def supports(self, q, mask):
        return _FWD is not None and q.device.type == "cpu" and q.dtype in (
            torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def _mask(self, q, k, causal, mask):
        """(is_causal flag, additive mask or None, boolean allowed mask or None)."""
        if mask is None:
            return causal, None, None
        allowed = allowed_mask(q.shape[1], k.shape[1], causal, mask, q.device)
        return False, additive_mask(allowed, q.dtype), allowed

    def forward(self, q, k, v, *, scale, causal, mask):
        is_causal, attn_mask, allowed = self._mask(q, k, causal, mask)
        out, lse = _FWD(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        out, lse = fix_empty_rows(out.transpose(1, 2), lse.float(), allowed)
        return nan_query_rows(q, out, lse)

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, mask):
        is_causal, attn_mask, _ = self._mask(q, k, causal, mask)
        # Rows that see no key anywhere keep lse -inf; the op wants a finite value there
        # (its probabilities for those rows are zero through the mask anyway).
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = finite_lse(lse).to(lse_dtype)
        dq, dk, dv = _BWD(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, is_causal,
            attn_mask=attn_mask, scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
