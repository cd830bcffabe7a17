"""Float64 reference attention over the full (unsharded) sequence, and test inputs."""

from __future__ import annotations

import torch

from megaring.layout import document_positions  # noqa: F401 - the tests' name for it


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


def masked_reference(q, k, v, *, causal: bool, segment_ids, positions, window=None):
    """Float64 attention whose mask comes from tokens: same segment, ``pos_k <= pos_q`` (causal),
    ``pos_q - pos_k < window`` (``|...|`` without causal). Global sequences, any order."""
    q, k, v = q.double(), k.double(), v.double()
    b, s, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
    pq, pk = positions[:, :, None], positions[:, None, :]
    allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        allowed &= pk <= pq
    if window is not None:
        allowed &= (pq - pk < window) if causal else ((pq - pk).abs() < window)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1).nan_to_num(0.0), v)


def document_mix(kind: str, seq: int, seed: int) -> torch.Tensor:
    """Segment ids (seq,) of one sample: "one" document, many "tiny" ones, "huge" plus tiny ones,
    "awkward" lengths (primes), or "short" (all of 3 tokens)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "one":
        lengths = [seq]
    elif kind == "tiny":
        lengths = [int(x) for x in torch.randint(1, 4, (seq,), generator=g)]
    elif kind == "huge":
        lengths = [seq * 3 // 4] + [int(x) for x in torch.randint(1, 5, (seq,), generator=g)]
    elif kind == "awkward":
        lengths = [7, 13, 29, 3, 31, 11, 17] * seq
    elif kind == "short":
        lengths = [3] * seq
    else:
        raise ValueError(kind)
    ids, n = [], 0
    for i, length in enumerate(lengths):
        take = min(length, seq - n)
        ids += [i] * take
        n += take
        if n == seq:
            break
    return torch.tensor(ids)


