"""The balanced layout's plan: every token once, S / cp per rank, deterministic, the reader's too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaring.data.doc_mixes import pack_samples, sample_segment_ids, stream
from megaring.data.reader import sample_doc_lengths
from megaring.layout import balanced_ranges, document_lengths, ranges_work, shard_sequence, unshard_sequence
from megaring.ring.route import build_route, local_runs
from tests.helpers.attention_ref import document_positions

MIXES = ("one", "tiny", "huge", "awkward", "short")


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_plan_covers_every_token_once_with_equal_shards(mix, cp):
    seg = sample_segment_ids(mix, 96 * cp, seed=cp)
    lengths = document_lengths(seg)
    plan = balanced_ranges(lengths, cp)
    assert plan == balanced_ranges(list(lengths), cp)  # deterministic, plain integers
    tokens = sorted(t for ranges in plan for a, b in ranges for t in range(a, b))
    assert tokens == list(range(seg.numel()))
    assert all(sum(b - a for a, b in ranges) == 96 for ranges in plan)
    assert all(ranges == sorted(ranges) for ranges in plan)  # global order inside a rank
    x = torch.arange(seg.numel())
    shards = [shard_sequence(x, dim=0, rank=r, world_size=cp, layout="balanced", segment_ids=seg) for r in range(cp)]
    assert torch.equal(unshard_sequence(shards, dim=0, layout="balanced", segment_ids=seg), x)


def test_plan_balances_lognormal_documents():
    lengths = pack_samples(stream("lognormal", 1 << 16), 1 << 16, 1)[0]  # the benchmark's first sample
    for cp in (2, 4, 8, 16):
        works = [ranges_work(lengths, r) for r in balanced_ranges(lengths, cp)]
        assert max(works) / np.mean(works) <= 1.05, cp


def test_reader_and_attention_compute_the_same_plan():
    seg = sample_segment_ids("awkward", 240, seed=0)
    lengths = document_lengths(seg)
    doc_starts = np.concatenate([[0, 5], 5 + np.cumsum(lengths)])  # a 5-token document before the sample
    assert sample_doc_lengths(doc_starts, 5, 240) == lengths
    assert sample_doc_lengths(doc_starts, 7, 240)[0] == lengths[0] - 2  # starting inside a document


def test_route_sends_only_rows_a_later_rank_sees():
    """From the plan alone: every row range a block carries at hop t is needed at hop >= t (its
    first and last rows are seen there), and no rank past the block's last hop sees any of it."""
    seq, cp, window = 192, 4, 9
    seg = torch.stack([sample_segment_ids("huge", seq, 1), sample_segment_ids("awkward", seq, 2)])
    pos = document_positions(seg)
    shard = dict(dim=1, world_size=cp, layout="balanced", segment_ids=seg)
    runs = [local_runs(shard_sequence(seg, rank=r, **shard), shard_sequence(pos, rank=r, **shard)) for r in range(cp)]
    metas = [(shard_sequence(seg, rank=r, **shard), shard_sequence(pos, rank=r, **shard)) for r in range(cp)]

    def seen(q, k):  # (S_local,) bool: keys of rank k seen by some query of rank q
        (sq, pq), (sk, pk) = metas[q], metas[k]
        pq, pk = pq[:, :, None], pk[:, None]
        mask = (sq[:, :, None] == sk[:, None]) & (pk <= pq) & (pq - pk < window)
        return mask.any(dim=1).any(dim=0)

    for j in range(cp):
        route = build_route(runs, j, seq // cp, True, window)
        for t in range(1, cp):
            rank_seen = seen((j + t) % cp, j)
            if t > route.last[j]:
                assert not rank_seen.any()
                continue
            later = torch.stack([seen((j + u) % cp, j) for u in range(t, route.last[j] + 1)]).any(0)
            a, b = route.carry[j][t]
            assert later[a] and later[b - 1] and not later[:a].any() and not later[b:].any()
