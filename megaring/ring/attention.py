"""Ring attention: exact attention over a sequence sharded across a cp process group.

Forward: K/V blocks (with ``H_kv`` heads, never expanded) travel around the ring; the next
block's transfer is posted before the current block is computed, and block results are
merged with a float32 online softmax. Backward runs a second ring: K/V travel again,
together with float32 dK/dV accumulators that return to their owners after a full turn.
The autograd function only orchestrates: kernels compute, :class:`RingComm` communicates.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from megaring.kernels import BlockKernel, select_kernel
from megaring.ring.comm import RingComm, dense
from megaring.ring.layout import check_layout
from megaring.ring.merge import merge_into
from megaring.ring.schedule import ALL, BlockCall, BlockPlan, block_calls, plan_block

KV_TAG, GRAD_TAG = 11, 12


class _Ring:
    """Facts shared by forward and backward: group, rank, size and the block plan."""

    def __init__(self, group, causal: bool, layout: str, local_len: int):
        self.group, self.causal, self.layout, self.local_len = group, causal, layout, local_len
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.size > 1 else 0

    def plan(self, step: int) -> BlockPlan | None:
        src = (self.rank - step) % self.size
        return plan_block(self.rank, src, self.size, self.local_len, causal=self.causal, layout=self.layout)

    def calls(self, step: int, seg_q, seg_k) -> Iterator[BlockCall]:
        """This step's kernel calls (document masks tiled; fully masked blocks and tiles left out)."""
        return block_calls(self.plan(step), seg_q, seg_k)


def _whole_block(ring: _Ring, seg) -> BlockCall | None:
    """With one rank and one unmasked-or-single-tile call: no ring, no merge, one kernel call.

    Bit-identical to the ring path (merging one block into an empty accumulator returns it as is),
    without its float32 buffers and bookkeeping.
    """
    if ring.size > 1:
        return None
    calls = ring.calls(0, seg, seg)
    call = next(calls, None)
    whole = call is not None and call.q == ALL and call.kv == ALL and next(calls, None) is None
    return call if whole else None


def _ring_forward(ring: _Ring, kernel: BlockKernel, q, k, v, seg, scale):
    if (call := _whole_block(ring, seg)) is not None:
        out, lse = kernel.forward(q, k, v, scale=scale, causal=call.causal, mask=call.mask)
        return out.to(q.dtype), lse
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)
    comm = RingComm(ring.group, KV_TAG) if ring.size > 1 else None
    k_cur, v_cur, seg_cur = k, v, seg
    for step in range(ring.size):
        if step < ring.size - 1:
            nxt = comm.send_recv([k_cur, v_cur] + ([seg_cur] if seg is not None else []))
        for call in ring.calls(step, seg, seg_cur):
            o_b, lse_b = kernel.forward(q[:, call.q], k_cur[:, call.kv], v_cur[:, call.kv],
                                        scale=scale, causal=call.causal, mask=call.mask)
            merge_into(out[:, call.q], lse[:, :, call.q], o_b, lse_b)
        if step < ring.size - 1:
            comm.wait()
            k_cur, v_cur = nxt[0], nxt[1]
            seg_cur = nxt[2] if seg is not None else None
    return out.to(q.dtype), lse


def _accumulate(acc, grad, rows: slice, like: torch.Tensor):
    """``acc[:, rows] += grad`` in float32. A first gradient covering every row becomes the
    accumulator itself, so the peak step holds no extra zero-filled buffer."""
    if acc is None:
        if grad is not None and rows == ALL:
            return grad.to(torch.float32).contiguous()
        acc = torch.zeros_like(like, dtype=torch.float32)
    if grad is not None:
        acc[:, rows] += grad
    return acc


def _block_grads(kernel: BlockKernel, c: BlockCall, dout, q, k, v, out, lse, scale):
    return kernel.backward(dout[:, c.q], q[:, c.q], k[:, c.kv], v[:, c.kv], out[:, c.q], lse[:, :, c.q],
                           scale=scale, causal=c.causal, mask=c.mask)


def _ring_backward(ring: _Ring, kernel: BlockKernel, dout, q, k, v, out, lse, seg, scale):
    if (call := _whole_block(ring, seg)) is not None:
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=call.causal, mask=call.mask)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    kv_comm = RingComm(ring.group, KV_TAG) if ring.size > 1 else None
    grad_comm = RingComm(ring.group, GRAD_TAG) if ring.size > 1 else None
    k_cur, v_cur, seg_cur = k, v, seg
    dq = dk = dv = None  # float32 accumulators; dk/dv belong to the K/V block held this step
    received: list[torch.Tensor] = []  # dk/dv accumulators arriving from the previous rank
    for step in range(ring.size):
        if step < ring.size - 1:
            nxt = kv_comm.send_recv([k_cur, v_cur] + ([seg_cur] if seg is not None else []))
        tiles = ring.calls(step, seg, seg_cur)
        call = next(tiles, None)
        # The first call's gradients are computed while the dK/dV accumulators are still in flight.
        grads = _block_grads(kernel, call, dout, q, k_cur, v_cur, out, lse, scale) if call else None
        if step > 0:
            grad_comm.wait()
            dk, dv = received
        if call is None:  # nothing visible this step: the accumulators exist anyway and travel on
            dq, dk, dv = _accumulate(dq, None, ALL, q), _accumulate(dk, None, ALL, k), _accumulate(dv, None, ALL, v)
        while call is not None:
            dq = _accumulate(dq, grads[0], call.q, q)
            dk, dv = _accumulate(dk, grads[1], call.kv, k), _accumulate(dv, grads[2], call.kv, v)
            call = next(tiles, None)
            grads = _block_grads(kernel, call, dout, q, k_cur, v_cur, out, lse, scale) if call else None
        if ring.size > 1:
            received = grad_comm.send_recv([dk, dv])
        if step < ring.size - 1:
            kv_comm.wait()
            k_cur, v_cur = nxt[0], nxt[1]
            seg_cur = nxt[2] if seg is not None else None
    if ring.size > 1:
        grad_comm.wait()  # after a full turn each rank receives its own blocks' gradients
        dk, dv = received
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, group, causal, scale, layout, kernel):
        ring = _Ring(group, causal, layout, q.shape[1])
        out, lse = _ring_forward(ring, kernel, q, k, v, segment_ids, scale)
        ctx.save_for_backward(q, k, v, out, lse, segment_ids)
        ctx.ring, ctx.kernel, ctx.scale = ring, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seg = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.ring, ctx.kernel, dense(dout), q, k, v, out, lse, seg, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


def heads_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, S, H, D)`` as a view of ``(B, H, S, D)`` memory (a copy only if not already so).

    The fused attention kernels take ``(B, H, S, D)`` and read it fastest when each head's rows
    are contiguous; the ring sends these tensors in their own memory order.
    """
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def check_inputs(q, k, v, segment_ids, layout: str) -> None:
    """Raise one ValueError naming every problem with the inputs (before any communication)."""
    check_layout(layout)
    problems = []
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, local_seq, heads, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        problems.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        problems.append(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, local_seq and head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        problems.append(f"n_heads={q.shape[2]} must be a multiple of n_kv_heads={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        problems.append(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        problems.append(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if layout == "zigzag" and q.shape[1] % 2:
        problems.append(f"local_seq={q.shape[1]} must be even with the zigzag layout (two chunks per rank)")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != tuple(q.shape[:2]):
            problems.append(f"segment_ids must have shape (batch, local_seq) = {tuple(q.shape[:2])}; "
                            f"got {tuple(segment_ids.shape)}")
        if segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
            problems.append(f"segment_ids must be integers; got {segment_ids.dtype}")
    if problems:
        raise ValueError("ring_attention: " + "; ".join(problems))


def ring_attention(q, k, v, *, group=None, causal: bool = True, softmax_scale: float | None = None,
                   segment_ids=None, layout: str = "zigzag", kernel: str | None = None):
    """Exact attention over a sequence sharded across ``group`` in ``layout``.

    q: (B, S_local, H, D); k, v: (B, S_local, H_kv, D); segment_ids: optional (B, S_local)
    integers, a query attends only to keys of its own segment (and, if ``causal``, at a
    global position not after its own). ``group=None`` is the default group, or plain
    attention when torch.distributed is not initialised. Returns (B, S_local, H, D).
    """
    check_inputs(q, k, v, segment_ids, layout)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    block_kernel = select_kernel(kernel, q, needs_mask=segment_ids is not None)
    seg = None if segment_ids is None else segment_ids.to(torch.int64).contiguous()
    return RingAttentionFunction.apply(heads_major(q), heads_major(k), heads_major(v), seg,
                                       group, causal, scale, layout, block_kernel)
