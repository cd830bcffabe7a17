"""Ring attention's backward: a second ring that brings every K/V block's gradients home.

dQ stays with its queries. K/V blocks travel again, each with float32 dK/dV accumulators that
collect every rank's contribution and return to their owner after a full turn. Two schedules:
``whole`` blocks with double buffers (fastest), and ``chunked`` (least memory): blocks computed in
tiles, a chunk of key rows at a time, with K/V and accumulators sent chunk by chunk.
"""

from __future__ import annotations

import torch

from megaring.kernels import BlockKernel
from megaring.ring import steps
from megaring.ring.comm import GRAD_TAG, KV_TAG, SEG_TAG, RingComm
from megaring.ring.schedule import ALL, BlockCall, Chunk, backward_chunks
from megaring.ring.steps import Ring


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


def _ring_backward_whole(ring: Ring, kernel: BlockKernel, dout, q, k, v, out, lse, seg, scale):
    """dQ stays home; whole K/V blocks travel again, with their float32 dK/dV accumulators.

    Double buffers: the next K/V block arrives while this one is computed, and the accumulators of
    this block arrive while those of the previous one leave. The fastest schedule; the chunked one
    below holds about one block of each instead of two.
    """
    if (call := steps.single_call(ring, seg)) is not None:
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


def _ring_backward_chunked(ring: Ring, kernel: BlockKernel, dout, q, k, v, out, lse, seg, scale):
    """dQ stays home; K/V blocks travel again, each with its float32 dK/dV accumulators.

    The block is computed tile by tile, one chunk of key rows (a column of tiles) at a time, so
    that its gradients never exist whole. Everything that travels goes chunk by chunk, one chunk
    in flight each way while a column is computed: the next block's K/V chunk j + 1 arrives in
    place of the chunk j just used and sent on, and the accumulators of this block arrive while
    those of the previous one leave. So about one block of K/V and one of accumulators exist at a
    time, instead of double buffers of both.
    """
    if (call := steps.single_call(ring, seg)) is not None:
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=call.causal, mask=call.mask)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    chunks, q_tiles = backward_chunks(ring.local_len, ring.layout, q.device.type)
    kvs, grads = _KVChunks(ring, chunks, k, v), _GradChunks(ring, chunks, k)
    seg_comm = RingComm(ring.group, SEG_TAG) if seg is not None and ring.size > 1 else None
    dq = torch.zeros_like(q, dtype=torch.float32)
    seg_cur = seg
    for step in range(ring.size):
        more = step < ring.size - 1
        kvs.begin(more)
        if seg_comm is not None and more:
            seg_next = seg_comm.send_recv([seg_cur])
        for j, chunk in enumerate(chunks):
            acc = grads.arrive(j)  # this block's [dk, dv] rows of the chunk, None on its first rank
            for piece in chunk.pieces:
                for call in ring.calls(step, seg, seg_cur, kv=piece, q_tiles=q_tiles):
                    k_t, v_t = kvs.rows(j, call.kv)
                    dq_t, dk_t, dv_t = kernel.backward(dout[:, call.q], q[:, call.q], k_t, v_t, out[:, call.q],
                                                       lse[:, :, call.q], scale=scale, causal=call.causal,
                                                       mask=call.mask)
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
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _KVChunks:
    """The K/V block being computed in the backward ring, in chunks, and the next one arriving.

    :meth:`begin` posts the exchange of chunk 0 (this block's chunk 0 to the next rank, the next
    block's from the previous one); :meth:`done` is called once column j is computed: it completes
    exchange j, drops this block's chunk j (sent and used) and posts exchange j + 1, which overlaps
    the next column. Each exchange is one send and one receive that every rank posts in the same
    order, so the ring cannot deadlock whatever order a backend completes them in.
    """

    def __init__(self, ring: Ring, chunks: list[Chunk], k: torch.Tensor, v: torch.Tensor):
        self.comm = RingComm(ring.group, KV_TAG) if ring.size > 1 else None
        self.chunks = chunks
        self.own = (k, v)  # this rank's block, read in place on the first step
        self.current: list | None = None  # [k, v] per chunk of a block that arrived
        self.arrived: list = []
        self.more = False

    def rows(self, j: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at ``rows`` (shard coordinates, inside chunk j) of the block being computed."""
        if self.current is None:
            return self.own[0][:, rows], self.own[1][:, rows]
        part = self.chunks[j].local(rows)
        return self.current[j][0][:, part], self.current[j][1][:, part]

    def _post(self, j: int) -> None:
        send = [self.chunks[j].gather(t) for t in self.own] if self.current is None else self.current[j]
        self.incoming = self.comm.send_recv(send)

    def begin(self, more: bool) -> None:
        """Start a step; ``more``: another step follows, so this block travels on."""
        self.more = more
        if more:
            self._post(0)

    def done(self, j: int) -> None:
        if not self.more:
            return
        self.comm.wait()
        self.arrived.append(self.incoming)
        if self.current is not None:
            self.current[j] = None  # sent and used
        if j + 1 < len(self.chunks):
            self._post(j + 1)

    def turn(self) -> None:
        self.current, self.arrived = self.arrived, []


class _GradChunks:
    """The float32 dK/dV accumulators of the K/V blocks in the backward ring, in chunks.

    Step by step: :meth:`arrive` hands over chunk j of the block being computed (received from the
    previous rank, which computed that block one step earlier) once chunk j of the previous step's
    block has gone to the next rank, and posts the exchange of chunk j + 1, so that one chunk is in
    flight each way while the caller computes; :meth:`keep` stores the chunk once this rank's
    gradients are in; :meth:`turn` ends the step and posts the exchange of chunk 0.
    After the last step every block is one rank short of its owner: :meth:`home` delivers them.
    """

    def __init__(self, ring: Ring, chunks: list[Chunk], like: torch.Tensor):
        self.comm = RingComm(ring.group, GRAD_TAG) if ring.size > 1 else None
        self.chunks, self.like = chunks, like
        self.passing: list | None = None  # the previous step's block, chunk by chunk, until sent
        self.current: list = []  # this step's block, chunks done so far
        self.incoming = None

    def zeros(self, j: int) -> list[torch.Tensor]:
        b, _, h, d = self.like.shape  # heads-major, as the kernels return their gradients
        return [torch.zeros(b, h, self.chunks[j].rows, d, dtype=torch.float32, device=self.like.device).transpose(1, 2)
                for _ in range(2)]

    def arrive(self, j: int) -> list[torch.Tensor] | None:
        if self.passing is None:
            return None
        self.comm.wait()
        here, self.passing[j] = self.incoming, None  # sent: the previous block's chunk j is gone
        if j + 1 < len(self.chunks):
            self.incoming = self.comm.send_recv(self.passing[j + 1])  # overlaps computing chunk j
        return here

    def keep(self, j: int, acc: list[torch.Tensor] | None) -> None:
        self.current.append(acc if acc is not None else self.zeros(j))

    def turn(self) -> None:
        self.passing, self.current = self.current, []
        if self.comm is not None:  # chunk 0 travels while the caller waits for its next K/V block
            self.incoming = self.comm.send_recv(self.passing[0])

    def home(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dK, dV) of this rank's own block, ``(B, S_local, H_kv, D)`` float32."""
        b, s, h, d = self.like.shape
        dk, dv = (torch.empty(b, s, h, d, dtype=torch.float32, device=self.like.device) for _ in range(2))
        for j, chunk in enumerate(self.chunks):  # one more hop: to the next rank, which owns the block
            acc = self.arrive(j) if self.comm is not None else self.passing[j]
            for piece in chunk.pieces:
                dk[:, piece], dv[:, piece] = acc[0][:, chunk.local(piece)], acc[1][:, chunk.local(piece)]
        return dk, dv


# How the backward ring runs: "whole" blocks with double buffers (fastest), or "chunked": tiles and
# chunks, about one block of K/V and of dK/dV accumulators at a time (least memory).
BACKWARDS = {"whole": _ring_backward_whole, "chunked": _ring_backward_chunked}
