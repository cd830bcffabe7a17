"""Pure-torch block kernel: float32 (or float64) math, any device, any mask. The reference for the others."""

from __future__ import annotations

import torch

from megaring.kernels.base import BlockKernel, allowed_mask, expand_kv_heads, finite_lse, reduce_kv_heads


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Compute in float32, or float64 for float64 inputs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _probs(q, k, scale, lse, allowed):
    """Attention probabilities (B, H, Sq, Sk) normalised by ``lse`` (B, H, Sq)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.exp(scores - finite_lse(lse)[..., None]), scores


class TorchKernel(BlockKernel):
    name = "torch"

    def forward(self, q, k, v, *, scale, causal, mask):
        h = q.shape[2]
        qf, kf, vf = _acc(q).transpose(1, 2), expand_kv_heads(_acc(k), h), expand_kv_heads(_acc(v), h)  # (B, H, S, D)
        allowed = allowed_mask(q.shape[1], k.shape[1], causal, mask, q.device)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq); -inf for empty rows
        probs, _ = _probs(qf, kf, scale, lse, allowed)
        out = torch.matmul(probs, vf)  # (B, H, Sq, D)
        return out.transpose(1, 2).to(q.dtype), lse.float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, mask):
        h, h_kv = q.shape[2], k.shape[2]
        qf, kf, vf = _acc(q).transpose(1, 2), expand_kv_heads(_acc(k), h), expand_kv_heads(_acc(v), h)
        do, of = _acc(dout).transpose(1, 2), _acc(out).transpose(1, 2)  # (B, H, Sq, D)
        allowed = allowed_mask(q.shape[1], k.shape[1], causal, mask, q.device)
        probs, _ = _probs(qf, kf, scale, lse, allowed)  # (B, H, Sq, Sk)
        dv = torch.matmul(probs.transpose(-1, -2), do)  # (B, H, Sk, D)
        dp = torch.matmul(do, vf.transpose(-1, -2))  # (B, H, Sq, Sk)
        delta = (do * of).sum(-1, keepdim=True)  # (B, H, Sq, 1)
        ds = probs * (dp - delta) * scale
        dq = torch.matmul(ds, kf).transpose(1, 2)  # (B, Sq, H, D)
        dk = torch.matmul(ds.transpose(-1, -2), qf)  # (B, H, Sk, D)
        return dq.to(q.dtype), reduce_kv_heads(dk, h_kv).to(k.dtype), reduce_kv_heads(dv, h_kv).to(v.dtype)
