"""context_attention (Ulysses x ring) on 4 gloo ranks against float64 attention on the unsharded sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

from megaring import context_attention, shard_sequence, unshard_sequence
from megaring.distributed import ParallelDims, build_mesh
from megaring.distributed.mesh import Traffic
from megaring.layout import shard_ranges, ulysses_gather_order
from tests.helpers.attention_ref import make_inputs
from megaring.ring.dense_reference import masked_reference

SEQ = 48  # divisible by 2*cp for cp in (2, 4), and by 2 * ring chunks
HEAD_DIM = 8
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1), "gqa8": (8, 2)}
FACTORS = [(4, 1, 4), (4, 2, 2), (4, 4, 1), (2, 2, 1)]  # (cp, ulysses, ring)


def _mesh(world, cp, ulysses):
    return build_mesh(ParallelDims(dp=world // cp, cp=cp, ulysses=ulysses), timeout_s=60)


def _task(rank, world, cp, ulysses, layouts=("zigzag", "contiguous")):
    mesh = _mesh(world, cp, ulysses)
    assert (mesh.cp_ulysses.size, mesh.cp_ring.size) == (ulysses, cp // ulysses)
    assert mesh.cp.rank == mesh.cp_ring.rank * ulysses + mesh.cp_ulysses.rank
    results = {}
    for layout, causal, (name, (h, hk)), with_seg in itertools.product(layouts, (True, False), HEADS.items(),
                                                                        (False, True)):
        q, k, v, dout, seg = make_inputs(11, 2, SEQ, h, hk, HEAD_DIM, with_seg)
        shard = dict(dim=1, rank=mesh.cp.rank, world_size=cp, layout=layout)
        ql, kl, vl = (shard_sequence(t, **shard).requires_grad_() for t in (q, k, v))
        seg_l = None if seg is None else shard_sequence(seg, **shard)
        out = context_attention(ql, kl, vl, ulysses_group=mesh.cp_ulysses, ring_group=mesh.cp_ring, causal=causal,
                                segment_ids=seg_l, layout=layout, kernel="torch")
        out.backward(shard_sequence(dout, **shard))
        results[(layout, causal, name, with_seg)] = [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)]
    return mesh.cp.rank, results


def _reference(name, with_seg, causal):
    h, hk = HEADS[name]
    q, k, v, dout, seg = make_inputs(11, 2, SEQ, h, hk, HEAD_DIM, with_seg)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = masked_reference(q, k, v, causal=causal, segment_ids=seg)
    out.backward(dout.double())
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("cp,ulysses,ring", FACTORS)
def test_matches_float64_reference(pools, cp, ulysses, ring):
    per_rank = pools(4).run(_task, cp, ulysses)
    by_cp = {}
    for cp_rank, results in per_rank:  # dp replicas (cp=2 on 4 ranks) must agree too
        by_cp.setdefault(cp_rank, []).append(results)
    for case in per_rank[0][1]:
        layout, causal, name, with_seg = case
        expected = _reference(name, with_seg, causal)
        for i, what in enumerate(("out", "dq", "dk", "dv")):
            for replica in range(len(by_cp[0])):
                got = unshard_sequence([by_cp[r][replica][case][i] for r in range(cp)], dim=1, layout=layout)
                err = (got.double() - expected[i]).abs().max().item()
                assert err <= 1e-4, f"(u={ulysses}, ring={ring}) {case} {what}: max abs error {err:.3g}"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp,ulysses", [(4, 2), (8, 4), (8, 2), (6, 3), (4, 4)])
def test_gathered_shards_are_the_ring_shard(layout, cp, ulysses):
    """The gathered sequence of a Ulysses group is its ring rank's shard over cp/ulysses, in ring order."""
    seq, ring = 4 * cp, cp // ulysses
    for ring_rank in range(ring):
        pieces = []
        for member, piece in ulysses_gather_order(ulysses, layout):
            a, b = shard_ranges(seq, ring_rank * ulysses + member, cp, layout)[piece]
            pieces += range(a, b)
        ring_tokens = [t for a, b in shard_ranges(seq, ring_rank, ring, layout) for t in range(a, b)]
        assert pieces == ring_tokens


def _bad_heads_task(rank, world):
    mesh = _mesh(world, 4, 4)
    q = torch.zeros(1, 8, 6, 4)  # 6 query heads: not divisible by 4
    k = torch.zeros(1, 8, 3, 4)  # 3 kv heads: neither a multiple nor a divisor of 4
    try:
        context_attention(q, k, k, ulysses_group=mesh.cp_ulysses, ring_group=mesh.cp_ring,
                          segment_ids=torch.zeros(1, 7, dtype=torch.long))
    except ValueError as err:
        return str(err)
    return ""


def test_every_head_problem_in_one_error(pools):
    for msg in pools(4).run(_bad_heads_task):
        assert "query heads (6)" in msg and "kv heads (3)" in msg and "segment_ids" in msg, msg


def _bytes_task(rank, world, cp, ulysses, heads, kv_heads, with_seg):
    mesh = _mesh(world, cp, ulysses)
    q, k, v, dout, seg = make_inputs(3, 2, SEQ, heads, kv_heads, HEAD_DIM, with_seg)
    shard = dict(dim=1, rank=mesh.cp.rank, world_size=cp, layout="zigzag")
    ql, kl, vl = (shard_sequence(t, **shard).requires_grad_() for t in (q, k, v))
    seg_l = None if seg is None else shard_sequence(seg, **shard)
    traffic = Traffic()  # the caller's counter (the trainer's kv_bytes_sent_*) sees both kinds
    out = context_attention(ql, kl, vl, ulysses_group=mesh.cp_ulysses, ring_group=mesh.cp_ring, segment_ids=seg_l,
                            traffic=traffic)
    out.backward(shard_sequence(dout, **shard))
    return mesh.cp_ulysses.traffic.bytes_sent, mesh.cp_ring.traffic.bytes_sent, traffic.bytes_sent


@pytest.mark.parametrize("heads,kv_heads,with_seg", [(4, 4, False), (4, 1, True), (8, 2, True)])
def test_bytes_sent_match_the_cost_model(pools, heads, kv_heads, with_seg):
    """What the communication layer counts at cp=4 is what tools.plan_cp predicts, byte for byte."""
    from megaring.plan.cp import Workload, a2a_bytes, ring_bytes

    w = Workload(SEQ, heads, kv_heads, HEAD_DIM, batch=2, dtype_bytes=4, segment_ids=with_seg)
    for ulysses in (1, 2, 4):
        for a2a, ring, caller in pools(4).run(_bytes_task, 4, ulysses, heads, kv_heads, with_seg):
            assert caller == {k: v for k, v in (a2a | ring).items() if v}, (ulysses, caller)
            assert sum(a2a.values()) == a2a_bytes(w, 4, ulysses), (ulysses, a2a)
            assert sum(ring.values()) == ring_bytes(w, 4, ulysses), (ulysses, ring)
            assert set(a2a) <= {"all_to_all"} and set(ring) <= {"ring_p2p"}


def _tp_mesh_task(rank, world):
    """dp 2 x ulysses 2 x tp 2: each tp rank attends over its own heads, Ulysses splits them again."""
    mesh = build_mesh(ParallelDims(dp=2, cp=2, tp=2, ulysses=2), timeout_s=60)
    q, k, v, dout, seg = make_inputs(5, 2, SEQ, 8, 4, HEAD_DIM, True)
    heads = slice(mesh.tp.rank * 4, (mesh.tp.rank + 1) * 4)
    kv = slice(mesh.tp.rank * 2, (mesh.tp.rank + 1) * 2)
    shard = dict(dim=1, rank=mesh.cp.rank, world_size=2, layout="zigzag")
    ql, kl, vl = (shard_sequence(t[:, :, s], **shard).requires_grad_() for t, s in ((q, heads), (k, kv), (v, kv)))
    out = context_attention(ql, kl, vl, ulysses_group=mesh.cp_ulysses, ring_group=mesh.cp_ring,
                            segment_ids=shard_sequence(seg, **shard))
    out.backward(shard_sequence(dout[:, :, heads], **shard))
    return dict(coords=(mesh.dp.rank, mesh.cp.rank, mesh.tp.rank), ulysses_ranks=mesh.cp_ulysses.ranks,
                ring_size=mesh.cp_ring.size, tensors=[t.detach() for t in (out, ql.grad, kl.grad, vl.grad)])


def test_dp2_ulysses2_tp2_mesh(pools):
    results = pools(8).run(_tp_mesh_task)
    dims = ParallelDims(2, 2, 2, ulysses=2)
    q, k, v, dout, seg = make_inputs(5, 2, SEQ, 8, 4, HEAD_DIM, True)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = masked_reference(q, k, v, causal=True, segment_ids=seg)
    out.backward(dout.double())
    for rank, r in enumerate(results):
        dp, cp, tp = r["coords"]
        assert rank == dims.rank_of(dp, cp, tp) and r["ring_size"] == 1
        assert r["ulysses_ranks"] == tuple(dims.rank_of(dp, i, tp) for i in range(2))  # tp ranks apart
    for dp, tp in itertools.product(range(2), range(2)):
        shards = [results[dims.rank_of(dp, cp, tp)]["tensors"] for cp in range(2)]
        heads, kv = slice(tp * 4, (tp + 1) * 4), slice(tp * 2, (tp + 1) * 2)
        for i, (what, want) in enumerate([("out", out[:, :, heads]), ("dq", q.grad[:, :, heads]),
                                          ("dk", k.grad[:, :, kv]), ("dv", v.grad[:, :, kv])]):
            got = unshard_sequence([s[i] for s in shards], dim=1, layout="zigzag").double()
            assert (got - want).abs().max().item() <= 1e-4, f"dp={dp} tp={tp} {what}"
