"""Ring attention on 1-4 gloo ranks against float64 attention on the unsharded sequence."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from megaring import RingSettings, ring_attention, shard_sequence, unshard_sequence
from megaring.ring import comm as ring_comm
from tests.helpers.attention_ref import make_inputs
from megaring.ring.dense_reference import masked_reference

SEQ = 24  # divisible by 2*W for W in 1..4
HEAD_DIM = 16
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
KERNELS = ("torch", "cpu_flash")


def _run_case(rank, world, layout, causal, heads, kv_heads, with_seg, kernel, dtype, seed, backward="whole",
              settings=None):
    q, k, v, dout, seg = make_inputs(seed, 2, SEQ, heads, kv_heads, HEAD_DIM, with_seg)
    shard = dict(dim=1, rank=rank, world_size=world, layout=layout)
    ql, kl, vl = (shard_sequence(t, **shard).to(dtype).requires_grad_() for t in (q, k, v))
    seg_l = None if seg is None else shard_sequence(seg, **shard)
    out = ring_attention(ql, kl, vl, group=dist.group.WORLD, causal=causal, segment_ids=seg_l,
                         layout=layout, kernel=kernel, backward=backward, settings=settings)
    out.backward(shard_sequence(dout, **shard).to(dtype))
    return [t.detach().float() for t in (out, ql.grad, kl.grad, vl.grad)]


def _cases_task(rank, world, layout, causal, dtype, backward="whole", settings=None):
    """Every head layout x segments x kernel for one (world, layout, causal); returns per case results."""
    results = {}
    for (name, (h, hk)), with_seg, kernel in itertools.product(HEADS.items(), (False, True), KERNELS):
        results[(name, with_seg, kernel)] = _run_case(rank, world, layout, causal, h, hk, with_seg, kernel,
                                                      dtype, seed=7, backward=backward, settings=settings)
    return results


def _reference(name, with_seg, causal, seed=7):
    h, hk = HEADS[name]
    q, k, v, dout, seg = make_inputs(seed, 2, SEQ, h, hk, HEAD_DIM, with_seg)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = masked_reference(q, k, v, causal=causal, segment_ids=seg)
    out.backward(dout.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def _check(per_rank, layout, causal, tol_abs, tol_rel=0.0):
    for case, _ in per_rank[0].items():
        name, with_seg, _kernel = case
        expected = _reference(name, with_seg, causal)
        for i, what in enumerate(("out", "dq", "dk", "dv")):
            got = unshard_sequence([r[case][i] for r in per_rank], dim=1, layout=layout).double()
            err = (got - expected[i]).abs().max().item()
            bound = tol_abs + tol_rel * expected[i].abs().max().item()
            assert err <= bound, f"{case} {what}: max abs error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
def test_float32_matches_reference(pools, world, layout, causal):
    per_rank = pools(world).run(_cases_task, layout, causal, torch.float32)
    _check(per_rank, layout, causal, tol_abs=1e-4)


@pytest.mark.parametrize("world,backward", [(2, "whole"), (4, "whole"), (2, "chunked")])
def test_bfloat16_matches_reference(pools, world, backward):
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per element); accumulation is float32, so
    # the error stays at a few bf16 ulps of the largest value: 3e-2 relative to max |expected|.
    per_rank = pools(world).run(_cases_task, "zigzag", True, torch.bfloat16, backward)
    _check(per_rank, "zigzag", True, tol_abs=1e-3, tol_rel=3e-2)


def _chunked_backward_task(rank, world, layout, causal):
    """The chunked backward with chunks of a few rows (3 per local shard, which the shard's length does not always
    divide) and query tiles of two key pieces, so that diagonal tiles split around their key pieces, with
    document masks also cut into tiles of a few rows."""
    from megaring.ring.chunks import backward_chunks

    settings = RingSettings(grad_chunks=3, min_chunk_rows=1, q_tile_pieces=2, mask_entries=40)
    sent = []
    original = ring_comm.RingComm.send_recv

    def spy(self, tensors):
        sent.append((self.tag, [tuple(t.shape) for t in tensors]))
        return original(self, tensors)

    ring_comm.RingComm.send_recv = spy
    try:
        chunks, _ = backward_chunks(SEQ // world, layout, settings)
        return (_cases_task(rank, world, layout, causal, torch.float32, "chunked", settings), sent,
                {c.rows for c in chunks})
    finally:
        ring_comm.RingComm.send_recv = original


@pytest.mark.parametrize("world,layout,causal", [(1, "zigzag", True), (2, "zigzag", True), (3, "zigzag", True),
                                                 (4, "contiguous", True), (4, "zigzag", False)])
def test_chunked_backward_matches_reference(pools, world, layout, causal):
    from megaring.ring.comm import GRAD_TAG, KV_TAG

    per_rank = pools(world).run(_chunked_backward_task, layout, causal)
    _check([results for results, _, _ in per_rank], layout, causal, tol_abs=1e-4)
    local, chunk_rows = SEQ // world, per_rank[0][2]
    assert len(chunk_rows) >= 1 and max(chunk_rows) < local

    def rows_sent(want):
        return {shape[1] for tag, shapes in per_rank[0][1] if tag == want for shape in shapes}

    assert rows_sent(GRAD_TAG) == (chunk_rows if world > 1 else set())  # accumulators: in chunks only
    assert rows_sent(KV_TAG) == (chunk_rows | {local} if world > 1 else set())  # whole blocks in the forward only


def _kv_shapes_task(rank, world):
    """Record what travels around the ring for a GQA call."""
    sent = []
    original = ring_comm.RingComm.send_recv

    def spy(self, tensors):
        sent.append([tuple(t.shape) for t in tensors])
        return original(self, tensors)

    ring_comm.RingComm.send_recv = spy
    try:
        _run_case(rank, world, "zigzag", True, 8, 2, False, None, torch.float32, seed=3)
    finally:
        ring_comm.RingComm.send_recv = original
    return sent


def test_kv_travels_with_kv_heads_only(pools):
    sent = pools(2).run(_kv_shapes_task)[0]
    local = SEQ // 2
    assert sent, "nothing was sent around the ring"
    # forward: one K/V transfer; backward: one K/V transfer and two dK/dV transfers
    assert sent.count([(2, local, 2, HEAD_DIM)] * 2) == 4
    assert all(shape[2] == 2 for msg in sent for shape in msg)


def _bad_input_task(rank, world):
    q = torch.randn(1, 6, 4, 8)
    k = torch.randn(1, 6, 3, 8)  # 4 heads not a multiple of 3 kv heads
    try:
        ring_attention(q, k, k, group=dist.group.WORLD)
    except ValueError as err:
        msg = str(err)
    else:
        msg = ""
    # The group must still be usable: nothing was left half-sent.
    t = torch.ones(1)
    dist.all_reduce(t)
    return msg, t.item()


def test_bad_input_raises_before_communication(pools):
    results = pools(2).run(_bad_input_task)
    for msg, total in results:
        assert "n_heads=4 must be a multiple of n_kv_heads=3" in msg
        assert total == 2.0


def _masked_blocks_task(rank, world):
    """One document per rank: every off-diagonal block is masked by segments and must be skipped."""
    from megaring.kernels import KERNELS

    inner = KERNELS["torch"]
    calls = []

    class Counting(type(inner)):
        def forward(self, *a, **kw):
            calls.append("fwd")
            return inner.forward(*a, **kw)

        def backward(self, *a, **kw):
            calls.append("bwd")
            return inner.backward(*a, **kw)

    q, k, v, dout, _ = make_inputs(5, 2, SEQ, 4, 2, HEAD_DIM, False)
    seg = (torch.arange(SEQ) // (SEQ // world)).expand(2, SEQ)  # document d = rank d's chunk
    shard = dict(dim=1, rank=rank, world_size=world, layout="contiguous")
    ql, kl, vl = (shard_sequence(t, **shard).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, group=dist.group.WORLD, causal=False, layout="contiguous",
                         segment_ids=shard_sequence(seg, **shard), kernel=Counting())
    out.backward(shard_sequence(dout, **shard))
    return calls, [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)], seg


def test_blocks_masked_by_segments_are_skipped(pools):
    results = pools(4).run(_masked_blocks_task)
    for calls, _, _ in results:
        assert calls == ["fwd", "bwd"]
    q, k, v, dout, _ = make_inputs(5, 2, SEQ, 4, 2, HEAD_DIM, False)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref = masked_reference(q, k, v, causal=False, segment_ids=results[0][2])
    ref.backward(dout.double())
    for i, want in enumerate((ref.detach(), q.grad, k.grad, v.grad)):
        got = unshard_sequence([r[1][i] for r in results], dim=1, layout="contiguous")
        assert (got.double() - want).abs().max() <= 1e-4


def _tiled_masks_task(rank, world, layout, causal):
    """Document masks cut into tiles of a few query rows (a tiny budget forces many tiles per block)."""
    settings = RingSettings(mask_entries=40)
    return {(name, True, kernel): _run_case(rank, world, layout, causal, h, hk, True, kernel, torch.float32, 7,
                                            settings=settings)
            for (name, (h, hk)), kernel in itertools.product(HEADS.items(), KERNELS)}


@pytest.mark.parametrize("world,layout,causal", [(1, "zigzag", True), (3, "zigzag", True), (2, "contiguous", False)])
def test_document_masks_in_tiles_match_reference(pools, world, layout, causal):
    per_rank = pools(world).run(_tiled_masks_task, layout, causal)
    _check(per_rank, layout, causal, tol_abs=1e-4)


def _accumulator_layout_task(rank, world):
    """Documents [0, 3) and [3, 24) at cp=2 (zigzag): rank 1's diagonal block is one document, a
    single call whose gradient becomes its dK/dV accumulator, while rank 0's is cut into masked
    tiles summed into a fresh one. The accumulators travel as raw memory, so both must have the
    layout of K (heads-major), else the receiver reads them scrambled (a bug found by a staged run)."""
    q, k, v, dout, _ = make_inputs(7, 1, SEQ, 4, 4, HEAD_DIM, False)
    seg = (torch.arange(SEQ) >= 3).long()[None]
    shard = dict(dim=1, rank=rank, world_size=world, layout="zigzag")
    out = {}
    for backward in ("whole", "chunked"):
        ql, kl, vl = (shard_sequence(t, **shard).requires_grad_() for t in (q, k, v))
        o = ring_attention(ql, kl, vl, group=dist.group.WORLD, segment_ids=shard_sequence(seg, **shard),
                           kernel="torch", backward=backward, settings=RingSettings(mask_entries=40))
        o.backward(shard_sequence(dout, **shard))
        out[backward] = [t.detach() for t in (o, ql.grad, kl.grad, vl.grad)]
    return out, seg


def test_travelling_accumulators_keep_the_layout_of_k(pools):
    results = pools(2).run(_accumulator_layout_task)
    q, k, v, dout, _ = make_inputs(7, 1, SEQ, 4, 4, HEAD_DIM, False)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref = masked_reference(q, k, v, causal=True, segment_ids=results[0][1])
    ref.backward(dout.double())
    for backward in ("whole", "chunked"):
        for i, (what, want) in enumerate(zip(("out", "dq", "dk", "dv"), (ref.detach(), q.grad, k.grad, v.grad))):
            got = unshard_sequence([r[0][backward][i] for r in results], dim=1, layout="zigzag")
            assert (got.double() - want).abs().max() <= 1e-4, f"{backward} {what}"
