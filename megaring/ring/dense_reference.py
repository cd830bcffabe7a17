"""Plain float64 attention over a whole sequence: what ring attention is checked against.

The mask comes from the tokens: a query sees a key of the same document (``segment_ids``), at
``pos_k <= pos_q`` when causal, and within ``window`` positions (``pos_q - pos_k < window``;
``|pos_q - pos_k| < window`` without causal). Rows that see nothing give zeros, as the ring does.
Used by :mod:`megaring.ring.selfcheck` (``megaring-verify``) and the tests.
"""

from __future__ import annotations

import torch


def masked_reference(q, k, v, *, causal: bool, segment_ids=None, positions=None, window=None, scale=None):
    """Attention of q (B, S, H, D) over k, v (B, S, H_kv, D) in float64; ``positions`` and
    ``segment_ids`` (B, S) default to 0..S-1 and one document. Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    b, s, h, d = q.shape
    k, v = (t.repeat_interleave(h // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5 if scale is None else scale)
    if positions is None:
        positions = torch.arange(s).expand(b, s)
    pq, pk = positions[:, :, None], positions[:, None, :]
    allowed = torch.ones(b, s, s, dtype=torch.bool)
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        allowed &= pk <= pq
    if window is not None:
        allowed &= (pq - pk < window) if causal else ((pq - pk).abs() < window)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1).nan_to_num(0.0), v)
