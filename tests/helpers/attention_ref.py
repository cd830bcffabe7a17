"""Test inputs for attention (the float64 reference they are checked against: megaring.ring.dense_reference)."""

from __future__ import annotations

import torch

from megaring.layout import document_positions  # noqa: F401 - the tests' name for it


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
