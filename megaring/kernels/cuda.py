"""CUDA block kernels: the flash-attn package when installed, else torch's own CUDA ops.

torch's flash op (half precision, no mask) and memory-efficient op (any float dtype,
additive mask) both return the log-sum-exp and have explicit backward ops, so the ring
can drive them block by block. Neither takes GQA heads here: kv heads are expanded
locally (after communication) and their gradients summed back.
"""

from __future__ import annotations

import inspect

import torch

from megaring.kernels.base import (
    BlockKernel,
    additive_mask,
    allowed_mask,
    expand_kv_heads,
    finite_lse,
    fix_empty_rows,
    reduce_kv_heads,
)

_aten = torch.ops.aten


class TorchCudaKernel(BlockKernel):
    """torch's fused CUDA attention: flash when it applies, memory-efficient otherwise."""

    name = "cuda"

    def supports(self, q, mask):
        return q.device.type == "cuda"

    @staticmethod
    def _use_flash(q, mask) -> bool:
        return mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0

    def forward(self, q, k, v, *, scale, causal, mask):
        h = q.shape[2]
        qh, kh, vh = q.transpose(1, 2), expand_kv_heads(k, h), expand_kv_heads(v, h)  # (B, H, S, D)
        if self._use_flash(q, mask):
            out, lse = _aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)[:2]
            return out.transpose(1, 2), lse.float()
        allowed = allowed_mask(q.shape[1], k.shape[1], causal, mask, q.device)
        bias = None if allowed is None else additive_mask(allowed, q.dtype).expand(-1, h, -1, -1)
        out, lse = _aten._scaled_dot_product_efficient_attention(qh, kh, vh, bias, True, 0.0, False, scale=scale)[:2]
        empty_rows_possible = allowed if mask is not None else None  # causal alone leaves no row empty
        return fix_empty_rows(out.transpose(1, 2), lse[..., : q.shape[1]].float(), empty_rows_possible)

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, mask):
        h, h_kv, sq, sk = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
        qh, kh, vh = q.transpose(1, 2), expand_kv_heads(k, h), expand_kv_heads(v, h)
        doh, oh, lse = dout.transpose(1, 2), out.transpose(1, 2), finite_lse(lse).float()
        dev = q.device
        if self._use_flash(q, mask):
            # Dense (not varlen) call: cumulative lengths are None; no dropout, so the rng state is unused.
            seed = torch.zeros(2, dtype=torch.uint64, device=dev)
            offset = torch.zeros((), dtype=torch.uint64, device=dev)
            dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
                doh, qh, kh, vh, oh, lse.contiguous(), None, None, sq, sk, 0.0, causal, seed, offset, scale=scale)
        else:
            allowed = allowed_mask(sq, sk, causal, mask, dev)
            bias = None if allowed is None else additive_mask(allowed, q.dtype).expand(-1, h, -1, -1)
            # The memory-efficient op keeps its lse padded to a multiple of 32 rows.
            lse = torch.nn.functional.pad(lse, (0, -sq % 32)).contiguous()
            seed = offset = torch.zeros((), dtype=torch.int64, device=dev)
            dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
                doh, qh, kh, vh, bias, oh, lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale)
        return dq.transpose(1, 2), reduce_kv_heads(dk, h_kv), reduce_kv_heads(dv, h_kv)


class FlashAttnKernel(BlockKernel):
    """The flash-attn package (Dao et al.), half precision, no arbitrary masks; GQA native."""

    name = "flash_attn"

    def __init__(self):
        try:
            from flash_attn import flash_attn_interface as fa
        except ImportError:
            fa = None
        self._fa = fa

    def supports(self, q, mask):
        return self._fa is not None and q.device.type == "cuda" and mask is None and q.dtype in (
            torch.float16, torch.bfloat16)

    def forward(self, q, k, v, *, scale, causal, mask):
        out, lse, _ = self._fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out, lse.float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, mask):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kwargs = dict(dropout_p=0.0, softmax_scale=scale, causal=causal, alibi_slopes=None, deterministic=False)
        params = inspect.signature(self._fa._flash_attn_backward).parameters
        if "window_size_left" in params:  # flash-attn >= 2.7
            kwargs.update(window_size_left=-1, window_size_right=-1, softcap=0.0)
        else:
            kwargs.update(window_size=(-1, -1), softcap=0.0)
        kwargs = {n: val for n, val in kwargs.items() if n in params}
        self._fa._flash_attn_backward(dout.contiguous(), q, k, v, out, lse.contiguous(), dq, dk, dv, **kwargs)
        return dq, dk, dv
