"""data.balance=work: a permutation of the step's samples over dp ranks and micro-batches by attention cost."""

import itertools

import numpy as np
import pytest
import torch

from megaring.data import BatchShape, DataConfig, RankShard, build_batch_reader
from megaring.data.balance import balance_work, in_order, piece_pairs, plan_step, sample_cost
from megaring.data.reader import sample_doc_lengths

# Lognormal-ish documents (mean 300, a long tail) so samples of 512 tokens differ a lot in cost.
MOCK = DataConfig(kind="mock", vocab_size=97, num_tokens=200_000, mean_doc_len=300, max_doc_len=4_000)


def reader(*, balance="work", G=16, mb=2, dp=2, dp_rank=0, cp=1, cp_rank=0, window=None, seq_len=512):
    cfg = DataConfig(**{**MOCK.__dict__, "balance": balance})
    return build_batch_reader(cfg, BatchShape(seq_len, G, mb), RankShard(dp_rank, dp, cp_rank, cp, "zigzag"),
                              seed=5, window=window)


def brute_pairs(n: int, window: int | None) -> int:
    return sum(min(p + 1, window) if window else p + 1 for p in range(n))


def test_piece_pairs_count_causal_and_window_rules():
    for n, w in itertools.product([1, 2, 7, 64, 65, 300], [None, 1, 16, 64, 1000]):
        assert piece_pairs(np.array([n]), w)[0] == brute_pairs(n, w), (n, w)


def test_sample_cost_sums_its_document_pieces():
    doc_starts = np.array([0, 3, 10, 50, 100])  # documents of 3, 7, 40, 50 tokens
    # a 20-token sample at token 5 holds 5 tokens of doc 1 and 15 of doc 2
    pieces = sample_doc_lengths(doc_starts, 5, 20)
    assert sample_cost(pieces, None) == brute_pairs(5, None) + brute_pairs(15, None)
    assert sample_cost(pieces, 4) == brute_pairs(5, 4) + brute_pairs(15, 4)
    assert sample_cost([20], None) == brute_pairs(20, None)  # positions over the whole sample: one piece
    rd = reader(G=8, dp=2)  # the reader's cost of a sample is that of its pieces
    _, _, start = rd.locate(3)
    assert rd.sample_cost(3) == sample_cost(sample_doc_lengths(rd.source.doc_starts, start, 512), None)


def test_lpt_keeps_counts_and_evens_out_a_skewed_batch():
    costs = np.array([100, 50, 50, 1, 1, 1, 1, 1], dtype=np.int64)
    plan = balance_work(costs, dp=2, micro_batch_size=1)
    assert sorted(plan.slots.ravel().tolist()) == list(range(8))  # each sample once
    assert plan.slots.shape == (2, 4, 1)
    assert plan.rank_work.tolist() == [103, 102]  # {100, 1, 1, 1} and {50, 50, 1, 1}
    assert plan.dp_imbalance == pytest.approx(103 / 102.5)
    assert in_order(costs, 2, 1).dp_imbalance == pytest.approx(201 / 102.5)
    # micro-batch i of every rank holds the i-th most costly of its samples
    assert costs[plan.slots[:, 0, 0]].tolist() == [100, 50]
    with pytest.raises(ValueError, match="data.balance must be one of"):
        plan_step("fast", costs, 2, 1)


def test_the_example_of_docs_ring_attention():
    costs = np.array([9, 1, 2, 8, 1, 1, 3, 7], dtype=np.int64)
    assert plan_step("none", costs, 2, 1).dp_imbalance == 1.25
    plan = plan_step("work", costs, 2, 1)
    assert plan.slots[:, :, 0].tolist() == [[0, 6, 2, 1], [3, 7, 4, 5]] and plan.rank_work.tolist() == [15, 17]


def test_work_is_never_less_even_than_in_order():
    # LPT with a count per rank gives {6, 4, 1} | {5, 5, 3} = 11 | 13; in order {5, 1, 6} | {3, 5, 4} is 12 | 12
    costs = np.array([5, 1, 6, 3, 5, 4], dtype=np.int64)
    plan = balance_work(costs, dp=2, micro_batch_size=1)
    assert plan.rank_work.tolist() == [12, 12] and plan.dp_imbalance == 1.0
    assert plan.slots[:, :, 0].tolist() == [[2, 0, 1], [4, 5, 3]]  # the in-order sets, by decreasing cost
    rng = np.random.default_rng(0)
    for _ in range(2000):
        costs = rng.integers(1, 20, 8).astype(np.int64)
        plan = balance_work(costs, dp=2, micro_batch_size=2)
        assert sorted(plan.slots.ravel().tolist()) == list(range(8))
        assert plan.dp_imbalance <= in_order(costs, 2, 2).dp_imbalance + 1e-12, costs


def test_the_plan_is_a_permutation_identical_on_every_rank_and_fills_each_rank():
    for dp, mb in [(2, 2), (4, 1), (8, 2)]:
        readers = [reader(G=16, mb=mb, dp=dp, dp_rank=r) for r in range(dp)]
        plain = reader(balance="none", G=16, mb=mb, dp=1)
        for step in range(4):
            consumed = readers[0].consumed_samples(step)
            plans = [rd.step_plan(consumed) for rd in readers]
            assert all(np.array_equal(p.slots, plans[0].slots) for p in plans), (dp, mb, step)
            got = np.concatenate([rd.sample_ordinals(consumed).ravel() for rd in readers])
            assert got.shape == (16,) and sorted(got.tolist()) == plain.sample_ordinals(consumed).ravel().tolist()
            assert all(rd.sample_ordinals(consumed).shape == (16 // (dp * mb), mb) for rd in readers)


def test_balancing_lowers_the_dp_imbalance_over_steps():
    for dp in (2, 4):
        work = reader(G=8 * dp, mb=1, dp=dp)
        none = reader(balance="none", G=8 * dp, mb=1, dp=dp)
        before = [none.step_plan(none.consumed_samples(s)).dp_imbalance for s in range(10)]
        after = [work.step_plan(work.consumed_samples(s)).dp_imbalance for s in range(10)]
        assert all(a <= b + 1e-12 for a, b in zip(after, before)), (dp, before, after)
        assert np.median(after) < np.median(before) and np.median(after) <= 1.05, (dp, before, after)


def test_the_cost_follows_the_window():
    full = reader(G=8, dp=2)
    windowed = reader(G=8, dp=2, window=32)
    for k in range(8):
        assert windowed.sample_cost(k) <= full.sample_cost(k)
        assert windowed.sample_cost(k) <= 512 * 32


def test_a_bad_balance_is_a_config_error():
    assert any("data.balance must be one of" in p for p in DataConfig(balance="even").problems())


def test_dynamic_cp_size_is_the_smallest_group_that_holds_a_sample():
    from megaring.layout import dynamic_cp_size

    assert dynamic_cp_size(8, 2048, 2048, 8) == 1  # one rank holds a 2K sample
    assert dynamic_cp_size(8, 2048, 1024, 8) == 2
    assert dynamic_cp_size(8, 2048, 256, 8) == 8  # the whole ring
    assert dynamic_cp_size(8, 2048, 2048, 2) == 4  # 8 groups cannot share 2 micro-batches; 2 groups of 4 can
    assert dynamic_cp_size(6, 600, 300, 3) == 2  # 3 groups of 2 share 3 micro-batches


def test_cp_groups_take_every_kth_micro_batch_and_cover_the_step_once():
    """parallel.dynamic_cp: cp = 4 in 2 groups of 2; the groups' shards rebuild every sample of the step once."""
    from megaring.layout import unshard_sequence

    G, mb, seq_len = 8, 1, 512
    plain = reader(balance="none", G=G, mb=mb, dp=1)
    expected = {int(k): plain.read_sample(int(k)) for k in plain.sample_ordinals(0).ravel()}
    seen = {}
    for group in range(2):
        rds = [build_batch_reader(MOCK, BatchShape(seq_len, G, mb), RankShard(0, 1, r, 2, "zigzag", 2, group), seed=5)
               for r in range(2)]
        assert rds[0].num_micro_batches == 4
        ordinals = rds[0].sample_ordinals(0)
        assert ordinals.ravel().tolist() == plain.sample_ordinals(0).ravel()[group::2].tolist()
        for k in ordinals.ravel():
            shards = [torch.from_numpy(rd.read_sample(int(k))["tokens"])[None] for rd in rds]
            seen[int(k)] = unshard_sequence(shards, dim=1, layout="zigzag")[0]
    assert sorted(seen) == sorted(expected)
    for k, full in seen.items():
        assert torch.equal(full, torch.from_numpy(expected[k]["tokens"])), k
    with pytest.raises(ValueError, match="cannot be shared by 3 cp groups"):
        build_batch_reader(MOCK, BatchShape(seq_len, G, mb), RankShard(0, 1, 0, 1, "zigzag", 3, 0), seed=5)
