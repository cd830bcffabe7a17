"""Which part of each (query shard, key shard) pair a rank computes at each ring step.

At step s, rank r holds the keys of rank j = (r - s) mod W. With a causal mask:

- contiguous layout: j < r all visible; j == r the causal diagonal; j > r nothing.
- zigzag layout (rank r holds chunks r and 2W-1-r, each of c tokens):
  j == r: the local causal block (local order follows global order);
  j < r:  every query sees the first key chunk (chunk j), none sees chunk 2W-1-j;
  j > r:  only the second query chunk (2W-1-r) sees the keys, and it sees all of them.
  Each of these costs 2c*c query-key pairs (the diagonal skips its masked half), so
  every rank does the same work at every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockPlan:
    q: slice  # local query rows to compute
    kv: slice  # rows of the key/value block they attend to
    causal: bool  # square diagonal block with a lower-triangular mask


ALL = slice(None)


def plan_block(rank: int, src: int, size: int, local_len: int, *, causal: bool, layout: str) -> BlockPlan | None:
    """The block rank ``rank`` computes against keys of rank ``src``; None if fully masked."""
    if not causal:
        return BlockPlan(ALL, ALL, False)
    if src == rank:
        return BlockPlan(ALL, ALL, True)
    if layout == "contiguous":
        return BlockPlan(ALL, ALL, False) if src < rank else None
    half = local_len // 2
    if src < rank:
        return BlockPlan(ALL, slice(0, half), False)
    return BlockPlan(slice(half, None), ALL, False)


# At most this many (batch x query x key) mask entries exist at once: 2^25 is 32 MiB of booleans
# plus 128 MiB for a kernel's float copy. Blocks with documents are cut into query-row tiles below it.
MASK_ENTRIES = 1 << 25
# Query rows per tile at most: short tiles span few documents, so their key ranges stay short.
MASK_TILE_ROWS = 512


# The backward computes each block in tiles, a chunk of key rows at a time, so that one tile's
# gradients are a small part of a block's; a chunk is also how K/V and the dK/dV accumulators travel
# in the backward ring. The shard is cut in GRAD_CHUNKS chunks of at least MIN_CHUNK_ROWS rows (a
# kernel call on a GPU must be big enough to fill it), and a query tile spans Q_TILE_PIECES of the
# pieces that chunks are made of (on CPU one: two gained no time at cp=2, 1.33x against 1.31x SDPA
# in tools/bench_attention.py --q-tile-pieces, and 1024-row query tiles cost 5 MiB more at cp=4).
GRAD_CHUNKS = 8
MIN_CHUNK_ROWS = {"cpu": 128, "cuda": 2048}
Q_TILE_PIECES = {"cpu": 1, "cuda": 4}


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


def backward_chunks(length: int, layout: str, device: str = "cpu") -> tuple[list[Chunk], list[slice]]:
    """The backward's chunks of key rows, in the order they are computed and travel, and its
    query tiles.

    With the zigzag layout a chunk is one piece of each half of the shard. Every rank then has the
    same work in every chunk (off the diagonal, one rank sees only the first half of the keys with
    all its queries, the other all keys with half its queries), so that ranks passing chunks to
    each other one by one do not wait on each other. Query tiles do not cross the halves, so that a
    tile on the causal diagonal holds each key piece whole.
    """
    kind = "cpu" if device == "cpu" else "cuda"
    rows = max(MIN_CHUNK_ROWS[kind], -(-length // GRAD_CHUNKS))
    if length <= rows:  # one chunk: the whole shard, one tile
        return [Chunk((slice(0, length),))], [slice(0, length)]
    if layout == "zigzag":
        half, piece = length // 2, -(-rows // 2)
        firsts = grid(half, piece)
        seconds = [slice(half + p.start, half + p.stop) for p in firsts]
        q_tiles = grid(half, piece * Q_TILE_PIECES[kind])
        q_tiles += [slice(half + t.start, half + t.stop) for t in q_tiles]
        return [Chunk((a, b)) for a, b in zip(firsts, seconds, strict=True)], q_tiles
    return [Chunk((t,)) for t in grid(length, rows)], grid(length, rows * Q_TILE_PIECES[kind])


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``q`` against rows ``kv`` of the key block."""

    q: slice
    kv: slice
    causal: bool  # square diagonal block with a lower-triangular mask
    mask: torch.Tensor | None  # (B, rows of q, rows of kv) bool, True where attention is allowed


def grid(length: int, rows: int) -> list[slice]:
    """``[0, length)`` cut into consecutive slices of ``rows`` rows (the last may be shorter)."""
    return [slice(a, min(a + rows, length)) for a in range(0, length, rows)]


def block_calls(plan: BlockPlan | None, seg_q: torch.Tensor | None, seg_k: torch.Tensor | None, *,
                length: int | None = None, kv: slice | None = None, q_tiles: list[slice] | None = None,
                max_mask_entries: int | None = None) -> Iterator[BlockCall]:
    """The kernel calls that compute ``plan``, made one at a time (lazily, so that only one tile's
    mask exists at once); none when nothing is visible.

    ``kv`` keeps only the plan's key rows inside that range, and ``q_tiles`` (consecutive row
    ranges covering the shard) cuts its queries into tiles. On the causal diagonal a tile's keys
    must lie inside one query tile or before it: the tile then splits into rows that see none of
    them, a causal square and rows that see them all. ``length`` is the local shard length (taken
    from ``seg_q`` when given). Without ``kv`` and ``q_tiles``, the plan is one tile.

    Within a tile, without segment ids or when its queries and keys all belong to one document,
    this is one call without a mask. Otherwise the same-document mask (with causality folded in)
    is built in sub-tiles of query rows, so it never exceeds ``max_mask_entries`` whatever the
    block length (default :data:`MASK_ENTRIES`), and sub-tiles that see no key of their documents
    are skipped. When the keys' ids are sorted (packed samples, in either layout), a sub-tile
    attends only to the key range of its own documents, so a block of many short documents costs
    about (rows x document length), not (rows x block length).
    """
    if plan is None:
        return
    if kv is None and q_tiles is None:
        yield from _tile_calls(plan.q, plan.kv, plan.causal, seg_q, seg_k, max_mask_entries, length)
        return
    length = seg_q.shape[1] if length is None else length
    (q0, nq), (k0, nk) = _span(plan.q, length), _span(plan.kv, length)
    if kv is not None:
        c0, nc = _span(kv, length)
        k0, k1 = max(k0, c0), min(k0 + nk, c0 + nc)
        nk = k1 - k0
    if nk <= 0:
        return
    for qt in q_tiles or [slice(0, length)]:
        qs = slice(max(qt.start, q0), min(qt.stop, q0 + nq))
        if qs.start < qs.stop:
            yield from _tile_calls(qs, slice(k0, k0 + nk), plan.causal, seg_q, seg_k, max_mask_entries, length)


def _tile_calls(qs: slice, ks: slice, causal: bool, seg_q, seg_k, max_mask_entries, length) -> Iterator[BlockCall]:
    """Calls for query rows ``qs`` against key rows ``ks``; ``causal``: key j is visible to query i
    only if j <= i (on the diagonal block, where local order is global order)."""
    if seg_q is None and length is None:  # a whole plan: causal plans are square diagonal blocks
        yield BlockCall(qs, ks, causal, None)
        return
    n = seg_q.shape[1] if seg_q is not None else length
    (q0, nq), (k0, nk) = _span(qs, n), _span(ks, n)
    if causal:
        if k0 > q0 + nq - 1:
            return  # every key after every query
        if k0 + nk - 1 <= q0:
            causal = False  # every key at or before every query
    if seg_q is None or _one_document(seg_q[:, qs], seg_k[:, ks]):
        if not causal or (q0, nq) == (k0, nk):
            yield BlockCall(qs, ks, causal, None)
            return
        if not q0 <= k0 < k0 + nk <= q0 + nq:
            raise AssertionError(f"keys {ks} cross the bounds of query tile {qs} on the causal diagonal")
        yield BlockCall(ks, ks, True, None)  # rows before k0 see none of these keys
        if k0 + nk < q0 + nq:
            yield BlockCall(slice(k0 + nk, q0 + nq), ks, False, None)  # rows after them see all
        return
    sq, sk = seg_q[:, q0:q0 + nq], seg_k[:, k0:k0 + nk].contiguous()  # (B, nq), (B, nk)
    tile = max(1, min(MASK_TILE_ROWS, (max_mask_entries or MASK_ENTRIES) // (sk.shape[0] * nk)))
    sorted_keys = bool((sk[:, 1:] >= sk[:, :-1]).all())  # packed samples: ids grow along the sequence
    for r0 in range(0, nq, tile):
        r1 = min(nq, r0 + tile)
        lo, hi = 0, nk
        if causal:  # query row q0 + r1 - 1 sees keys up to that index
            hi = min(hi, q0 + r1 - k0)
        if sorted_keys:  # only keys of the tile's documents: a document's tokens are contiguous
            ids = sq[:, r0:r1]
            lo = max(lo, int(torch.searchsorted(sk, ids.amin(1, keepdim=True)).min()))
            hi = min(hi, int(torch.searchsorted(sk, ids.amax(1, keepdim=True), right=True).max()))
        if lo >= hi:
            continue
        mask = sq[:, r0:r1, None] == sk[:, None, lo:hi]  # (B, r1 - r0, hi - lo)
        if causal:
            mask &= (torch.arange(k0 + lo, k0 + hi, device=mask.device)
                     <= torch.arange(q0 + r0, q0 + r1, device=mask.device)[:, None])
        if bool(mask.any()):
            whole = r0 == 0 and r1 == nq and lo == 0 and hi == nk  # one tile: keep the given slices
            yield BlockCall(qs if whole else slice(q0 + r0, q0 + r1), ks if whole else slice(k0 + lo, k0 + hi),
                            False, mask)


def _one_document(sq: torch.Tensor, sk: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(torch.cat([sq.flatten(), sk.flatten()]))
    return bool(lo == hi)


def _span(rows: slice, length: int) -> tuple[int, int]:
    start, stop, _ = rows.indices(length)
    return start, stop - start
