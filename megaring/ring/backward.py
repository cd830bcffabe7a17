"""Ring attention's backward: a second ring that brings every K/V block's gradients home.

dQ stays with its queries. K/V blocks travel again, each with float32 dK/dV accumulators that
collect every rank's contribution and return to their owner after a full turn. Two kinds:
``whole`` blocks with double buffers (fastest), and ``chunked`` (least memory): blocks computed in
tiles, a chunk of key rows at a time, with K/V and accumulators streamed chunk by chunk
(:mod:`megaring.ring.chunks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaring.kernels import BlockKernel
from megaring.ring.block_plan import ALL, Ring
from megaring.ring.chunks import GradStream, KVStream, backward_chunks
from megaring.ring.comm import GRAD_TAG, KV_TAG, SEG_TAG, RingComm
from megaring.ring.masks import BlockCall


@dataclass(frozen=True)
class Saved:
    """What the forward leaves for the backward, and the incoming gradient.

    q, dout, out: ``(B, S_local, H, D)``; k, v: ``(B, S_local, H_kv, D)``; lse: ``(B, H, S_local)``
    float32; seg: ``(B, S_local)`` int64 or None.
    """

    dout: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    seg: torch.Tensor | None
    scale: float

    def grads(self, kernel: BlockKernel, call: BlockCall, k: torch.Tensor, v: torch.Tensor):
        """``(dq, dk, dv)`` of one kernel call: this rank's queries against rows of block ``k``, ``v``."""
        bq = (call.batch, call.q)
        return kernel.backward(self.dout[bq], self.q[bq], k, v, self.out[bq], self.lse[call.batch, :, call.q],
                               scale=self.scale, causal=call.causal, mask=call.mask)

    def cast(self, dq, dk, dv):
        return dq.to(self.q.dtype), dk.to(self.k.dtype), dv.to(self.v.dtype)


def _accumulate(acc, grad, rows: slice, like: torch.Tensor):
    """``acc[:, rows] += grad`` in float32, ``acc`` in the memory layout of ``like``. A first
    gradient covering every row is copied into an uninitialised one (no zero-filled buffer).

    The layout matters: dK/dV accumulators travel as raw memory into a buffer shaped like the
    receiver's own (:meth:`RingComm.send_recv`), so every rank's must have K's (heads-major)
    strides; a kernel's gradient, kept as is, would be read scrambled by the next rank.
    """
    if acc is None:
        if grad is not None and rows == ALL:
            return torch.empty_like(like, dtype=torch.float32).copy_(grad)
        acc = torch.zeros_like(like, dtype=torch.float32)
    if grad is not None:
        acc[:, rows] += grad
    return acc


def _single_call(ring: Ring, kernel: BlockKernel, s: Saved):
    """One rank, one kernel call: no ring (see :meth:`Ring.single_call`); None otherwise."""
    call = ring.single_call(s.seg)
    if call is None:
        return None
    return s.cast(*kernel.backward(s.dout, s.q, s.k, s.v, s.out, s.lse, scale=s.scale, causal=call.causal,
                                   mask=call.mask))


def backward_whole(ring: Ring, kernel: BlockKernel, s: Saved):
    """dQ stays home; whole K/V blocks travel again, with their float32 dK/dV accumulators.

    Double buffers: the next K/V block arrives while this one is computed, and the accumulators of
    this block arrive while those of the previous one leave. The fastest schedule; the chunked one
    holds about one block of each instead of two.
    """
    if (done := _single_call(ring, kernel, s)) is not None:
        return done
    kv_comm = RingComm(ring.axis, KV_TAG, ring.traffic) if ring.size > 1 else None
    grad_comm = RingComm(ring.axis, GRAD_TAG, ring.traffic) if ring.size > 1 else None
    k_cur, v_cur, seg_cur = s.k, s.v, s.seg
    dq = dk = dv = None  # float32 accumulators; dk/dv belong to the K/V block held this step
    received: list[torch.Tensor] = []  # dk/dv accumulators arriving from the previous rank
    for step in range(ring.size):
        if step < ring.size - 1:
            nxt = kv_comm.send_recv([k_cur, v_cur] + ([seg_cur] if s.seg is not None else []))
        tiles = ring.calls(step, s.seg, seg_cur)
        call = next(tiles, None)
        # The first call's gradients are computed while the dK/dV accumulators are still in flight.
        grads = s.grads(kernel, call, k_cur[:, call.kv], v_cur[:, call.kv]) if call else None
        if step > 0:
            grad_comm.wait()
            dk, dv = received
        if call is None:  # nothing visible this step: the accumulators exist anyway and travel on
            dq, dk, dv = (_accumulate(dq, None, ALL, s.q), _accumulate(dk, None, ALL, s.k),
                          _accumulate(dv, None, ALL, s.v))
        while call is not None:
            dq = _accumulate(dq, grads[0], call.q, s.q)
            dk, dv = _accumulate(dk, grads[1], call.kv, s.k), _accumulate(dv, grads[2], call.kv, s.v)
            call = next(tiles, None)
            grads = s.grads(kernel, call, k_cur[:, call.kv], v_cur[:, call.kv]) if call else None
        if ring.size > 1:
            received = grad_comm.send_recv([dk, dv])
        if step < ring.size - 1:
            kv_comm.wait()
            k_cur, v_cur = nxt[0], nxt[1]
            seg_cur = nxt[2] if s.seg is not None else None
    if ring.size > 1:
        grad_comm.wait()  # after a full turn each rank receives its own blocks' gradients
        dk, dv = received
    return s.cast(dq, dk, dv)


def backward_chunked(ring: Ring, kernel: BlockKernel, s: Saved):
    """dQ stays home; K/V blocks travel again, each with its float32 dK/dV accumulators.

    The block is computed tile by tile, one chunk of key rows (a column of tiles) at a time, so
    that its gradients never exist whole, and everything that travels goes chunk by chunk (the
    protocol is in :mod:`megaring.ring.chunks`). About one block of K/V and one of accumulators
    exist at a time, instead of double buffers of both.
    """
    if (done := _single_call(ring, kernel, s)) is not None:
        return done
    chunks, q_tiles = backward_chunks(ring.local_len, ring.layout, ring.settings)
    kvs, grads = KVStream(ring, chunks, s.k, s.v), GradStream(ring, chunks, s.k)
    seg_comm = RingComm(ring.axis, SEG_TAG, ring.traffic) if s.seg is not None and ring.size > 1 else None
    dq = torch.zeros_like(s.q, dtype=torch.float32)
    seg_cur = s.seg
    for step in range(ring.size):
        more = step < ring.size - 1
        kvs.begin(more)
        if seg_comm is not None and more:
            seg_next = seg_comm.send_recv([seg_cur])
        for j, chunk in enumerate(chunks):
            acc = grads.arrive(j)  # this block's [dk, dv] rows of the chunk, None on its first rank
            for piece in chunk.pieces:
                for call in ring.calls(step, s.seg, seg_cur, kv=piece, q_tiles=q_tiles):
                    dq_t, dk_t, dv_t = s.grads(kernel, call, *kvs.rows(j, call.kv))
                    dq[:, call.q] += dq_t
                    if acc is None:
                        acc = grads.zeros(j)
                    rows = chunk.local(call.kv)
                    acc[0][:, rows] += dk_t
                    acc[1][:, rows] += dv_t
            grads.keep(j, acc)
            kvs.done(j)
        grads.turn()
        kvs.turn()
        if seg_comm is not None and more:
            seg_comm.wait()
            seg_cur = seg_next[0]
    dk, dv = grads.home()
    return s.cast(dq, dk, dv)


# How the backward ring runs: "whole" blocks with double buffers (fastest), or "chunked": tiles and
# chunks, about one block of K/V and of dK/dV accumulators at a time (least memory).
BACKWARDS = {"whole": backward_whole, "chunked": backward_chunked}
