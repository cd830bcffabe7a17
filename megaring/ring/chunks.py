"""The chunked backward's streams: K/V blocks and their dK/dV accumulators travelling in chunks.

A shard's rows are cut into chunks (:func:`backward_chunks`); each chunk travels as one tensor.
Per ring step a rank computes the block it holds one chunk (a column of tiles) at a time, while
two streams move chunks, one chunk in flight each way:

- :class:`KVStream` (K and V, forward direction of the ring)::

      begin(more)              post exchange 0 (this block's chunk 0 out, the next block's in)
      for j in chunks:
          rows(j, r)           read K/V rows of chunk j of the block being computed
          done(j)              complete exchange j, drop this block's chunk j, post exchange j + 1
      turn()                   the block that arrived becomes the one computed next

- :class:`GradStream` (float32 dK/dV accumulators of the block being computed)::

      for j in chunks:
          acc = arrive(j)      chunk j of this block's accumulators (None on the block's first rank);
                               completes the previous block's chunk j leaving and posts chunk j + 1
          ... add this rank's gradients into acc (zeros(j) when None) ...
          keep(j, acc)         store it until it is sent on
      turn()                   end the step: post chunk 0 of this block
      ... after the last step: home() -> (dK, dV) of this rank's own block, one more hop

Each exchange is one send and one receive that every rank posts in the same order, so the ring
cannot deadlock whatever order a backend completes them in. With zigzag a chunk pairs a piece of
each half of the shard, so that neighbouring ranks have equal work per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaring.ring.block_plan import Ring
from megaring.ring.comm import GRAD_TAG, KV_TAG, RingComm
from megaring.ring.settings import RingSettings


@dataclass(frozen=True)
class Chunk:
    """Rows of a local shard that travel together, as one tensor: its ``pieces`` in order."""

    pieces: tuple[slice, ...]

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    def local(self, rows: slice) -> slice:
        """``rows`` (inside one piece, in shard coordinates) as rows of the chunk's tensor."""
        offset = 0
        for p in self.pieces:
            if p.start <= rows.start and rows.stop <= p.stop:
                return slice(offset + rows.start - p.start, offset + rows.stop - p.start)
            offset += p.stop - p.start
        raise ValueError(f"rows {rows} are not inside one piece of {self.pieces}")

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of ``x`` ``(B, S, H, D)``, as one heads-major tensor (a copy)."""
        heads = x.transpose(1, 2)  # (B, H, S, D)
        return torch.cat([heads[:, :, p] for p in self.pieces], dim=2).transpose(1, 2)


def grid(length: int, rows: int) -> list[slice]:
    """``[0, length)`` cut into consecutive slices of ``rows`` rows (the last may be shorter)."""
    return [slice(a, min(a + rows, length)) for a in range(0, length, rows)]


def backward_chunks(length: int, layout: str, settings: RingSettings) -> tuple[list[Chunk], list[slice]]:
    """The backward's chunks of key rows, in the order they are computed and travel, and its
    query tiles (``settings`` resolved for the device).

    With the zigzag layout a chunk is one piece of each half of the shard. Every rank then has the
    same work in every chunk (off the diagonal, one rank sees only the first half of the keys with
    all its queries, the other all keys with half its queries), so that ranks passing chunks to
    each other one by one do not wait on each other. Query tiles do not cross the halves, so that a
    tile on the causal diagonal holds each key piece whole.
    """
    rows = max(settings.min_chunk_rows, -(-length // settings.grad_chunks))
    if length <= rows:  # one chunk: the whole shard, one tile
        return [Chunk((slice(0, length),))], [slice(0, length)]
    if layout == "zigzag":
        half, piece = length // 2, -(-rows // 2)
        firsts = grid(half, piece)
        seconds = [slice(half + p.start, half + p.stop) for p in firsts]
        q_tiles = grid(half, piece * settings.q_tile_pieces)
        q_tiles += [slice(half + t.start, half + t.stop) for t in q_tiles]
        return [Chunk((a, b)) for a, b in zip(firsts, seconds, strict=True)], q_tiles
    return [Chunk((t,)) for t in grid(length, rows)], grid(length, rows * settings.q_tile_pieces)


class KVStream:
    """The K/V block being computed in the backward ring, in chunks, and the next one arriving."""

    def __init__(self, ring: Ring, chunks: list[Chunk], k: torch.Tensor, v: torch.Tensor):
        self.comm = RingComm(ring.axis, KV_TAG, ring.traffic) if ring.size > 1 else None
        self.chunks = chunks
        self.own = (k, v)  # this rank's block, read in place on the first step
        self.current: list | None = None  # [k, v] per chunk of a block that arrived
        self.arrived: list = []
        self.incoming: list[torch.Tensor] | None = None
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


class GradStream:
    """The float32 dK/dV accumulators of the K/V blocks in the backward ring, in chunks.

    ``arrive(j)`` hands over chunk j of the block being computed (received from the previous rank,
    which computed that block one step earlier) once chunk j of the previous step's block has gone
    to the next rank. After the last step every block is one rank short of its owner.
    """

    def __init__(self, ring: Ring, chunks: list[Chunk], like: torch.Tensor):
        self.comm = RingComm(ring.axis, GRAD_TAG, ring.traffic) if ring.size > 1 else None
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
