"""The mask-aware ring (balanced layout, positions, windows) on 1-4 gloo ranks against float64."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megaring import ring_attention, shard_sequence, unshard_sequence
from megaring.distributed.mesh import Traffic
from megaring.ring.settings import RingSettings
from megaring.data.doc_mixes import sample_segment_ids
from tests.helpers.attention_ref import document_positions, make_inputs
from megaring.ring.dense_reference import masked_reference

SEQ = 48  # divisible by W and 2W for W in 1..4
MIXES = ("one", "tiny", "huge", "awkward")


def _inputs(mix, heads, kv_heads, seed=3):
    q, k, v, dout, _ = make_inputs(seed, 2, SEQ, heads, kv_heads, 8, False)
    seg = torch.stack([sample_segment_ids(mix, SEQ, seed), sample_segment_ids({"awkward": "one", "short": "short"}.get(mix, "awkward"), SEQ, 1)])
    return q, k, v, dout, seg, document_positions(seg)


# Calls cut at document boundaries (megaring.ring.pieces) at these tiny shapes: pieces of 2 rows
# and more run unmasked, windows in tiles of 5 rows; the default settings gather these short
# documents into masked tiles instead (the cases ending in None).
PIECES = RingSettings(piece_rows=2, mask_tile_rows=5)


def _case(rank, world, mix, layout, window, heads, kv_heads, backward, with_seg=True, settings=PIECES):
    q, k, v, dout, seg, pos = _inputs(mix, heads, kv_heads)
    if not with_seg:
        seg, pos = torch.zeros_like(seg), torch.arange(SEQ).expand(2, -1)
    shard = dict(dim=1, rank=rank, world_size=world, layout=layout, segment_ids=seg)
    ql, kl, vl = (shard_sequence(t, **shard).requires_grad_() for t in (q, k, v))
    traffic = Traffic()
    out = ring_attention(ql, kl, vl, group=dist.group.WORLD, segment_ids=shard_sequence(seg, **shard),
                         positions=shard_sequence(pos, **shard), window=window, layout=layout,
                         backward=backward, settings=settings, traffic=traffic)
    out.backward(shard_sequence(dout, **shard))
    return [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)], traffic.total()


def _cases_task(rank, world, cases):
    return [_case(rank, world, *c) for c in cases]


def _expected(mix, window, heads, kv_heads, with_seg=True):
    q, k, v, dout, seg, pos = _inputs(mix, heads, kv_heads)
    if not with_seg:
        seg, pos = torch.zeros_like(seg), torch.arange(SEQ).expand(2, -1)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = masked_reference(q, k, v, causal=True, segment_ids=seg, positions=pos, window=window)
    out.backward(dout.double())
    return [out.detach(), q.grad, k.grad, v.grad], seg


CASES = [(mix, "balanced", None, 4, 2, "whole") for mix in MIXES]
CASES += [("awkward", "balanced", 5, 4, 4, "chunked"), ("huge", "balanced", 9, 2, 1, "whole"),
          ("one", "zigzag", 7, 4, 2, "whole"), ("tiny", "contiguous", None, 4, 4, "chunked"),
          ("one", "zigzag", 6, 4, 2, "chunked", False), ("huge", "balanced", None, 4, 2, "whole", True, None),
          ("awkward", "balanced", 5, 2, 1, "chunked", True, None)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_mask_aware_ring_matches_reference(pools, world):
    per_rank = pools(world).run(_cases_task, CASES)
    for i, case in enumerate(CASES):
        mix, layout, window, h, hk, _backward, *rest = case
        expected, seg = _expected(mix, window, h, hk, *rest[:1])
        for n, what in enumerate(("out", "dq", "dk", "dv")):
            got = unshard_sequence([r[i][0][n] for r in per_rank], dim=1, layout=layout,
                                   segment_ids=seg).double()
            err = (got - expected[n]).abs().max().item()
            assert err <= 1e-4, f"world {world} {case} {what}: max abs error {err:.3g}"


def test_short_documents_send_nothing_and_windows_stop_the_ring(pools):
    # equal short documents (8 per rank at cp=2): each stays whole on one rank, nothing travels
    assert [r[0][1] for r in pools(2).run(_cases_task, [("short", "balanced", None, 4, 2, "whole")])] == [0, 0]
    cases = [("one", "contiguous", 4, 4, 2, "whole", False), ("one", "zigzag", None, 4, 2, "whole", False)]
    per_rank = pools(4).run(_cases_task, cases)
    window, full = ([r[i][1] for r in per_rank] for i in range(2))
    # window 4 < S/cp on contiguous: one hop of the last 3 rows of K and V, forward and again in the
    # backward, and their dK/dV straight home; the last rank sends no K/V, the first no gradients
    rows = 2 * 3 * (2 * 2 * 8 * 4)  # K and V, 3 rows of B * H_kv * D float32
    assert window == [2 * rows, 3 * rows, 3 * rows, rows]
    assert all(w < f for w, f in zip(window, full))
