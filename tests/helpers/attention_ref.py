"""Float64 reference attention over the full (unsharded) sequence, and test inputs."""

from __future__ import annotations

import torch


def reference_attention(q, k, v, *, causal: bool, segment_ids=None, scale=None):
    """Plain softmax attention in float64. q (B, S, H, D), k/v (B, S, H_kv, D)."""
    q, k, v = q.double(), k.double(), v.double()
    b, s, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5 if scale is None else scale)
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None].expand(b, s, s)
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def make_inputs(seed: int, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, with_segments: bool):
    """Unit-variance q, k, v, an upstream gradient, and segment ids whose documents cross shards."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=g)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=g)
    dout = torch.randn(batch, seq, heads, head_dim, generator=g)
    seg = None
    if with_segments:
        # Random document boundaries: documents of varied length, several crossing shard edges.
        cuts = torch.rand(batch, seq, generator=g) < 0.15
        cuts[:, 0] = False
        seg = cuts.long().cumsum(dim=1)
    return q, k, v, dout, seg
