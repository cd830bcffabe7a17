"""Ring attention at cp=2 (gloo) with inputs a hostile caller passes: ranks that disagree, NaN in q, k, v.

- ranks that disagree on local_seq (16 on one, 32 on the other) or on ``causal`` get one clear
  ValueError on every rank, naming the field and each rank's value, before any transfer (no abort,
  no hang, no silently different mask); the check is one all-gather per new call signature;
- a NaN in q, or in k / v on a remote rank, reaches every output that attends to it, in every
  dim, in the dense and the mask-aware ring, and the gradients of those rows are NaN too: never
  silently zeroed (torch's fused CPU op zeroed a NaN query's row; the kernel now restores the NaN).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megaring import ring_attention, shard_sequence, unshard_sequence
from megaring.layout import shard_positions
from tests.helpers.attention_ref import make_inputs

SEQ, HEADS, KV_HEADS, HEAD_DIM = 24, 4, 2, 8


def _disagreeing_call_task(rank, world, what):
    local_seq = {"shape": 16 if rank == 0 else 32, "causal": 16}[what]
    causal = rank == 0 if what == "causal" else True
    q = torch.randn(1, local_seq, 2, 8)
    try:
        ring_attention(q, q, q, group=dist.group.WORLD, causal=causal)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("what,named", [
    ("shape", "local_seq (rank 0: 16, rank 1: 32)"),
    ("causal", "causal (rank 0: True, rank 1: False)"),
])
def test_ranks_that_disagree_get_one_clear_error_each(pools, what, named):
    errors = pools(2).run(_disagreeing_call_task, what)
    for err in errors:
        assert err is not None and err.startswith("ring_attention: the ranks of the ring disagree on "), err
        assert named in err and err.count(" (rank 0:") == 1, err  # only the field that differs
    assert errors[0] == errors[1]


def _gathers_per_call_task(rank, world):
    """All-gathers made by three calls with one new signature, then by one with another."""
    counts, real = [], dist.all_gather

    def counting(*args, **kwargs):
        counts[-1] += 1
        return real(*args, **kwargs)

    dist.all_gather = counting
    try:
        for local_seq in (12, 12, 12, 20):
            counts.append(0)
            q = torch.randn(3, local_seq, 2, 8)
            ring_attention(q, q, q, group=dist.group.WORLD)
    finally:
        dist.all_gather = real
    return counts


def test_the_agreement_check_runs_once_per_call_signature(pools):
    assert pools(2).run(_gathers_per_call_task) == [[1, 0, 0, 1]] * 2


def _poisoned_inputs():
    """Full-sequence q, k, v, upstream gradient, with NaN in q (rank 0's shard), k (rank 1's) and v."""
    q, k, v, dout, _ = make_inputs(3, 2, SEQ, HEADS, KV_HEADS, HEAD_DIM, False)
    q[0, 4, 1] = float("nan")  # zigzag over 2 ranks of 24: rows 0-5 and 18-23 on rank 0
    k[1, 8, 0, 2] = float("nan")  # row 8: rank 1
    v[0, 14, 1, 0] = float("nan")  # row 14: rank 1
    return q, k, v, dout


def _expected_nan_rows():
    """(B, S, H): the rows whose output a NaN reaches: a NaN query, or a visible (causal) NaN key or value."""
    q, k, v, _ = _poisoned_inputs()
    group = HEADS // KV_HEADS
    bad_kv = (k.isnan() | v.isnan()).any(-1).repeat_interleave(group, dim=2)  # (B, S, H)
    seen = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()  # (query, key)
    reaches = torch.einsum("qk,bkh->bqh", seen.float(), bad_kv.float()) > 0
    return reaches | q.isnan().any(-1)


def _nan_task(rank, world, kernel, masked):
    q, k, v, dout = _poisoned_inputs()
    shard = dict(dim=1, rank=rank, world_size=world, layout="zigzag")
    ql, kl, vl = (shard_sequence(t, **shard).requires_grad_() for t in (q, k, v))
    positions = shard_positions(SEQ, rank, world, "zigzag").expand(2, -1) if masked else None
    out = ring_attention(ql, kl, vl, group=dist.group.WORLD, causal=True, kernel=kernel, positions=positions)
    out.backward(shard_sequence(dout, **shard))
    return out.detach(), ql.grad


@pytest.mark.parametrize("kernel", ["torch", "cpu_flash"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense_ring", "mask_aware_ring"])
def test_nan_inputs_reach_every_output_that_attends_to_them(pools, kernel, masked):
    per_rank = pools(2).run(_nan_task, kernel, masked)
    out = unshard_sequence([r[0] for r in per_rank], dim=1, layout="zigzag")
    dq = unshard_sequence([r[1] for r in per_rank], dim=1, layout="zigzag")
    expected = _expected_nan_rows()
    assert expected.any() and not expected.all()
    got = out.isnan().any(-1)  # (B, S, H)
    assert got[expected].all(), (got ^ expected).nonzero().tolist()  # every reached row
    assert out[0, 4, 1].isnan().all()  # the NaN query's row, in every dim
    assert dq.isnan().any(-1)[expected].all()  # and the gradients of the reached rows
    # A NaN key or value may also reach rows of its block that mask it (0 x NaN, NaN + -inf in the
    # fused kernels), but never a sample and head without NaN input.
    assert not got[0, :, 0].any() and not got[1, :, 2:].any()
