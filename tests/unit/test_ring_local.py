"""Single-process pieces of ring attention: layout, schedule balance, merge, kernels, input checks."""

from __future__ import annotations

import pytest
import torch

from megaring import ring_attention, shard_sequence, unshard_sequence
from megaring.kernels import KERNELS, select_kernel
from megaring.layout import shard_positions, shard_ranges
from megaring.ring.block_plan import plan_block
from megaring.ring.dense_reference import masked_reference
from megaring.ring.merge import merge_into
from tests.helpers.attention_ref import make_inputs


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_roundtrip(world, layout):
    x = torch.arange(3 * 48).view(3, 48)
    shards = [shard_sequence(x, dim=1, rank=r, world_size=world, layout=layout) for r in range(world)]
    assert all(s.shape == (3, 48 // world) for s in shards)
    assert torch.equal(unshard_sequence(shards, dim=1, layout=layout), x)
    for r, s in enumerate(shards):
        assert torch.equal(s[0], shard_positions(48, r, world, layout))


def test_zigzag_chunks():
    # W=2, 8 tokens: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 holds chunks 1 and 2.
    assert shard_ranges(8, 0, 2, "zigzag") == [(0, 2), (6, 8)]
    assert shard_ranges(8, 1, 2, "zigzag") == [(2, 4), (4, 6)]
    with pytest.raises(ValueError, match=r"not divisible by 2\*cp=4"):
        shard_ranges(10, 0, 2, "zigzag")


def _work(plan, local_len):
    if plan is None:
        return 0
    nq = len(range(local_len)[plan.q])
    nk = len(range(local_len)[plan.kv])
    return nq * nk // (2 if plan.causal else 1)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_causal_work_is_equal_every_step(world):
    local = 16
    for step in range(world):
        work = [_work(plan_block(r, (r - step) % world, world, local, causal=True, layout="zigzag"), local)
                for r in range(world)]
        assert len(set(work)) == 1, f"step {step}: {work}"
    # contiguous is imbalanced under causality: rank 0 skips every block but its own
    contiguous = [sum(_work(plan_block(r, (r - s) % world, world, local, causal=True, layout="contiguous"), local)
                      for s in range(world)) for r in range(world)]
    assert contiguous[0] < contiguous[-1]


def test_merge_matches_joint_softmax():
    torch.manual_seed(0)
    scores = torch.randn(1, 2, 3, 10)  # (B, H, Sq, Sk)
    scores[..., 0, :4] = float("-inf")  # row 0 sees nothing in the first block
    v = torch.randn(1, 10, 2, 5)
    full = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    out = torch.zeros(1, 3, 2, 5)
    lse = torch.full((1, 2, 3), float("-inf"))
    for a, b in ((0, 4), (4, 10)):
        blk = scores[..., a:b]
        blk_lse = torch.logsumexp(blk, -1)
        probs = torch.exp(blk - torch.where(torch.isfinite(blk_lse), blk_lse, 0)[..., None]).nan_to_num(0)
        merge_into(out, lse, torch.einsum("bhqk,bkhd->bqhd", probs, v[:, a:b]), blk_lse)
    assert torch.allclose(out, full, atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-6)


def test_cpu_flash_empty_rows_get_minus_inf_lse():
    q, k, v, _, _ = make_inputs(0, 1, 6, 2, 2, 8, False)
    mask = torch.ones(1, 6, 6, dtype=torch.bool)
    mask[:, 2] = False
    for name in ("cpu_flash", "torch"):
        out, lse = KERNELS[name].forward(q, k, v, scale=0.3, causal=False, mask=mask)
        assert torch.isneginf(lse[:, :, 2]).all(), name
        assert (out[:, 2] == 0).all(), name


@pytest.mark.parametrize("kernel", ["torch", "cpu_flash"])
@pytest.mark.parametrize("causal", [True, False])
def test_single_process_equals_plain_attention(kernel, causal):
    q, k, v, dout, seg = make_inputs(1, 2, 20, 6, 2, 8, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, causal=causal, segment_ids=seg, kernel=kernel)
    out.backward(dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = masked_reference(qr, kr, vr, causal=causal, segment_ids=seg)
    ref.backward(dout.double())
    assert (out.double() - ref).abs().max() < 1e-5
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert (got.double() - want).abs().max() < 1e-5


def test_auto_kernel_on_cpu_is_fused():
    assert select_kernel(None, torch.zeros(1), needs_mask=True).name == "cpu_flash"
    with pytest.raises(ValueError, match="unknown attention kernel"):
        select_kernel("nope", torch.zeros(1), needs_mask=False)


@pytest.mark.parametrize("q_shape,k_shape,seg_shape,dtype_k,match", [
    ((1, 5, 4, 8), (1, 5, 4, 8), None, torch.float32, "must be divisible by 2 with the zigzag layout"),
    ((1, 6, 4, 8), (1, 6, 3, 8), None, torch.float32, "multiple of n_kv_heads"),
    ((1, 6, 4, 8), (1, 4, 4, 8), None, torch.float32, "must agree in batch"),
    ((1, 6, 4, 8), (1, 6, 4, 8), None, torch.float64, "share one floating dtype"),
    ((1, 6, 4, 8), (1, 6, 4, 8), (1, 5), torch.float32, "segment_ids must have shape"),
])
def test_bad_inputs(q_shape, k_shape, seg_shape, dtype_k, match):
    q, k = torch.randn(q_shape), torch.randn(k_shape, dtype=dtype_k)
    seg = None if seg_shape is None else torch.zeros(seg_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        ring_attention(q, k, k, segment_ids=seg)


def test_unknown_backward():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="backward='lean' must be one of"):
        ring_attention(q, q, q, backward="lean")


def test_unknown_layout():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="spiral")


@pytest.mark.parametrize("kernel", ["torch", "cpu_flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,with_seg", [(True, False), (True, True), (False, True)])
def test_single_rank_fast_path_is_bit_identical_to_the_ring_path(monkeypatch, kernel, dtype, causal, with_seg):
    from megaring.distributed.mesh import Axis
    from megaring.ring.block_plan import Ring
    from megaring.ring.settings import RingSettings

    q, k, v, dout, seg = make_inputs(3, 2, 64, 4, 2, 16, with_seg)
    if not KERNELS[kernel].supports(q.to(dtype), None if seg is None else seg.bool()):
        pytest.skip(f"{kernel} does not run {dtype} here")

    def run():
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*leaves, causal=causal, segment_ids=seg, kernel=kernel)
        out.backward(dout.to(dtype))
        return [out.detach()] + [t.grad for t in leaves]

    ring = Ring(Axis.single("cp"), causal, "zigzag", 64, RingSettings().for_device("cpu"))
    assert ring.single_call(seg) is not None  # one kernel call
    fast = run()
    monkeypatch.setattr(Ring, "single_call", lambda self, seg: None)  # the general ring code, one step
    ring = run()
    for a, b in zip(fast, ring, strict=True):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


def test_block_calls_one_document_needs_no_mask():
    from megaring.ring.block_plan import ALL, BlockPlan
    from megaring.ring.masks import block_calls
    from megaring.ring.settings import RingSettings

    seg = torch.full((2, 16), 3)
    (call,) = block_calls(BlockPlan(ALL, ALL, True), seg, seg, RingSettings())
    assert call.mask is None and call.causal and call.q == ALL and call.kv == ALL


@pytest.mark.parametrize("ids", ["sorted", "unsorted"])
@pytest.mark.parametrize("causal", [True, False])
def test_block_calls_tile_document_masks_under_the_budget(causal, ids):
    from megaring.ring.block_plan import ALL, BlockPlan
    from megaring.ring.masks import block_calls
    from megaring.ring.settings import RingSettings

    g = torch.Generator().manual_seed(0)
    seg = (torch.rand(2, 32, generator=g) < 0.2).long().cumsum(1)  # (B, S) sorted document ids
    if ids == "unsorted":
        seg = seg % 2  # documents interleave: every tile must see every key
    plan = BlockPlan(slice(8, None), ALL, False) if not causal else BlockPlan(ALL, ALL, True)
    q_rows = range(32)[plan.q]
    full = seg[:, plan.q, None] == seg[:, None, plan.kv]
    if causal:
        full &= torch.ones(32, 32, dtype=torch.bool).tril()
    budget = 2 * 32 * 3  # three query rows of the full key block per tile
    calls = list(block_calls(plan, seg, seg, RingSettings(mask_entries=budget)))
    assert len(calls) > 1 and all(c.mask.numel() <= budget and not c.causal for c in calls)
    rebuilt = torch.zeros_like(full)
    for c in calls:
        assert c.mask.any()  # tiles without a visible key are not called
        rows = slice(c.q.start - q_rows.start, c.q.stop - q_rows.start)
        rebuilt[:, rows, c.kv] = c.mask
    assert torch.equal(rebuilt, full)
    columns = sum(c.mask.shape[-1] for c in calls)
    full_width = sum((c.q.stop if causal else 32) for c in calls)
    assert (columns < full_width) if ids == "sorted" else (columns == full_width)  # sorted: own documents only


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("src", [2, 1, 3])  # rank 2 of 4: diagonal, keys of an earlier rank, of a later one
def test_backward_tiles_cover_each_visible_pair_once(layout, src):
    from megaring.ring.chunks import backward_chunks
    from megaring.ring.masks import block_calls
    from megaring.ring.settings import RingSettings

    settings = RingSettings(grad_chunks=5, min_chunk_rows=1, q_tile_pieces=2)
    local = 40
    plan = plan_block(2, src, 4, local, causal=True, layout=layout)
    visible = torch.zeros(local, local, dtype=torch.int64)
    if plan is not None:
        visible[plan.q, plan.kv] = 1
        if plan.causal:
            visible = visible.tril()
    chunks, q_tiles = backward_chunks(local, layout, settings)
    assert len(chunks) == 5 and max(t.stop - t.start for t in q_tiles) > chunks[0].rows // len(chunks[0].pieces)
    covered = torch.zeros_like(visible)
    for chunk in chunks:
        for piece in chunk.pieces:
            for call in block_calls(plan, None, None, settings, length=local, kv=piece, q_tiles=q_tiles):
                assert call.mask is None and piece.start <= call.kv.start and call.kv.stop <= piece.stop
                rows = torch.ones(call.q.stop - call.q.start, call.kv.stop - call.kv.start, dtype=torch.int64)
                covered[call.q, call.kv] += rows.tril() if call.causal else rows
    assert torch.equal(covered, visible) and (plan is None or covered.any())
