"""The mask-aware ring's calls (megaring.ring.pieces) cover every visible pair exactly once."""

from __future__ import annotations

import functools

import pytest
import torch

from megaring import shard_sequence
from megaring.data.doc_mixes import sample_segment_ids
from megaring.ring.pieces import block_boxes
from megaring.ring.route import build_route, local_runs
from megaring.ring.settings import RingSettings
from tests.helpers.attention_ref import document_positions

SEQ = 48


def _visible(sq, pq, sk, pk, causal, window):
    mask = sq[:, :, None] == sk[:, None, :]  # (B, S_q, S_k)
    d = pq[:, :, None] - pk[:, None, :]
    if causal:
        mask &= d >= 0
    if window is not None:
        mask &= (d < window) if causal else (d.abs() < window)
    return mask


def _coverage(world, mixes, layout, causal, window, settings, same_samples=False):
    """Per (rank, block): how often each visible pair is computed, and the visible pairs."""
    seg = torch.stack([sample_segment_ids(m, SEQ, 5 + i) for i, m in enumerate(mixes)])
    if same_samples:
        seg = seg[:1].expand(len(mixes), -1)
    pos = document_positions(seg)
    shard = dict(dim=1, world_size=world, layout=layout, segment_ids=seg)
    metas = [(shard_sequence(seg, rank=r, **shard), shard_sequence(pos, rank=r, **shard)) for r in range(world)]
    runs = [local_runs(s, p) for s, p in metas]
    plain = 0
    for rank in range(world):
        route = build_route(runs, rank, SEQ // world, causal, window)
        for step in range(world):
            j = route.src(step)
            want = _visible(*metas[rank], *metas[j], causal, window).int()
            got = torch.zeros_like(want)
            if route.holds(step) and route.visible[j] is not None:
                held = route.carry[j][step]
                for box in block_boxes(runs[rank], runs[j], held, seg.shape[0], causal, window, settings):
                    assert 0 <= box.kv.start < box.kv.stop <= held[1] - held[0], (box, held)
                    kv = slice(held[0] + box.kv.start, held[0] + box.kv.stop)
                    cover = torch.ones_like(got[box.batch, box.q, kv])
                    if box.causal:
                        assert cover.shape[1] == cover.shape[2]
                        cover = cover.tril()
                    if box.masked:
                        cover = want[box.batch, box.q, kv]
                    got[box.batch, box.q, kv] += cover
                    plain += not box.masked
            assert torch.equal(got, want), (rank, step, (got - want).nonzero()[:5].tolist())
    return plain


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 7), (False, 6), (True, 2), (False, None)])
def test_calls_cover_every_visible_pair_once(world, causal, window):
    for settings in (RingSettings(piece_rows=2, mask_tile_rows=5), RingSettings(piece_rows=5, mask_tile_rows=3),
                     RingSettings()):
        plain = _coverage(world, ("awkward", "tiny", "huge"), "balanced", causal, window, settings)
        plain += _coverage(world, ("one", "one"), "zigzag", causal, window, settings, same_samples=True)
        if settings.piece_rows == 2:  # document pieces run as calls without masks
            assert plain > 0


def test_route_cache_reuses_the_route_of_the_same_id_tensors():
    from megaring.distributed.mesh import Axis
    from megaring.ring.attention import sparse_ring
    from megaring.ring.route import RouteCache

    seg = sample_segment_ids("awkward", SEQ, 1)[None]
    pos = document_positions(seg)
    q = torch.zeros(1, SEQ, 2, 4)
    routes, axis = RouteCache(), Axis.single("cp")
    ring = functools.partial(sparse_ring, axis, q, causal=True, window=None, layout="balanced",
                             settings=RingSettings(), traffic=None, routes=routes)
    first = ring(seg, pos)
    assert ring(seg, pos).route is first.route  # the next layer: the same tensors
    assert ring(seg.clone(), pos).route is not first.route  # another batch
    again = ring(seg, pos)
    pos.add_(0)  # changed in place: its version moves on
    assert ring(seg, pos).route is not again.route
