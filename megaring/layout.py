"""Where each cp rank's tokens sit in the global sequence: the layouts data and attention share.

A leaf module (torch only): the data reader shards samples by it and ring attention computes by
it, so neither has to import the other. Two layouts of a global sequence of length S over a cp
group of size W:

- ``"zigzag"``: the sequence is cut in ``2*W`` equal chunks; rank r holds chunks
  ``r`` and ``2W-1-r``, concatenated in that order. Under a causal mask every rank then
  does the same amount of attention work.
- ``"contiguous"``: rank r holds chunk r of W.
- ``"balanced"``: a function of the sample's document boundaries (its ``segment_ids``, or the
  document lengths) and W only (:func:`balanced_ranges`). Every rank holds exactly ``S / W``
  tokens, in global order; documents shorter than ``S / (2W)`` stay whole on one rank, longer ones
  are cut zigzag-style into ``2W`` pieces (piece i and ``2W-1-i`` on rank i, any length), and the
  rest are placed so that the causal query-key pairs per rank are as equal as possible. Ring
  attention needs the tokens' document positions to compute it (``positions=``).

Everything here is pure indexing: no communication.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Sequence

import torch

LAYOUTS = ("zigzag", "contiguous", "balanced")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunks_per_rank(layout: str) -> int:
    """How many chunks of the global sequence one rank holds (its local length must divide by it)."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1  # balanced: one run of ranges of S / W tokens


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into."""
    return chunks_per_rank(layout) * world_size


def dynamic_cp_size(cp: int, seq_len: int, tokens_per_rank: int, micro_batches: int) -> int:
    """The cp group size ``cp'`` of ``parallel.dynamic_cp``: the smallest divisor of ``cp`` whose
    ranks hold a sample of ``seq_len`` tokens within ``tokens_per_rank`` each (``seq_len / cp' <=
    tokens_per_rank``) and whose ``cp / cp'`` groups share a dp rank's ``micro_batches`` evenly
    (each group takes every ``cp / cp'``-th of them); ``cp`` when no smaller one does."""
    for size in range(1, cp):
        if cp % size == 0 and seq_len <= size * tokens_per_rank and micro_batches % (cp // size) == 0:
            return size
    return cp


def length_problem(seq_len: int, world_size: int, layout: str) -> str | None:
    """Why a global sequence of ``seq_len`` tokens cannot be laid out over ``world_size`` cp ranks, or None.

    The one statement of the rule: the length must split into :func:`num_chunks` equal chunks.
    """
    n = num_chunks(world_size, layout)
    if seq_len % n == 0:
        return None
    name = "2*cp" if layout == "zigzag" else "cp"  # balanced: S / cp tokens per rank
    return f"sequence length {seq_len} is not divisible by {name}={n} (cp={world_size}, {layout} layout)"


def chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The chunk indices rank ``rank`` holds, in local order (zigzag and contiguous)."""
    check_layout(layout)
    if layout == "balanced":
        raise ValueError("the balanced layout has no fixed chunks: its ranges depend on the documents")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of size {world_size}")
    if layout == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


Ranges = list[tuple[int, int]]


def shard_ranges(seq_len: int, rank: int, world_size: int, layout: str = "zigzag", *,
                 doc_lengths: Sequence[int] | None = None) -> Ranges:
    """Half-open global ranges ``[start, end)`` of the tokens rank ``rank`` holds, in local order.

    ``doc_lengths``: the sample's document lengths in order (summing to ``seq_len``), required by
    the balanced layout and ignored by the others.
    """
    problem = length_problem(seq_len, world_size, layout)
    if problem:
        raise ValueError(problem)
    if layout == "balanced":
        if doc_lengths is None:
            raise ValueError("the balanced layout needs the sample's documents (segment_ids or doc_lengths)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of size {world_size}")
        return balanced_ranges(doc_lengths, world_size)[rank]
    chunk = seq_len // num_chunks(world_size, layout)
    return [(c * chunk, (c + 1) * chunk) for c in chunk_ids(rank, world_size, layout)]


def document_lengths(segment_ids: torch.Tensor) -> tuple[int, ...]:
    """Lengths of the runs of equal ids of a ``(S,)`` sample: its documents, in order."""
    ids = torch.as_tensor(segment_ids).reshape(-1)
    if ids.numel() == 0:
        return ()
    edges = torch.nonzero(ids[1:] != ids[:-1]).reshape(-1) + 1  # first token of each later document
    bounds = [0, *edges.tolist(), ids.numel()]
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document, (..., S) from segment ids (..., S)."""
    s = segment_ids.shape[-1]
    idx = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


def ranges_work(doc_lengths: Sequence[int], ranges: Ranges) -> int:
    """Causal query-key pairs of the queries in global ``ranges`` of a sample of ``doc_lengths``."""
    starts = [0, *itertools.accumulate(doc_lengths)]
    total, i = 0, 0
    for a, b in ranges:
        i = bisect.bisect_right(starts, a) - 1
        while a < b:
            e = min(b, starts[i + 1])
            total += pair_work(a - starts[i], e - starts[i])
            a, i = e, i + 1
    return total


def pair_work(a: int, b: int) -> int:
    """Causal query-key pairs of the queries at document offsets ``[a, b)``: query i sees i + 1 keys."""
    return (b * (b + 1) - a * (a + 1)) // 2


def balanced_ranges(doc_lengths: Sequence[int], world_size: int) -> list[Ranges]:
    """The balanced layout's plan: for each rank, its global ranges in global order, ``S / W`` tokens.

    Deterministic and pure (plain integers): every rank and the data reader compute the same plan.
    Three passes over the documents, longest first (ties by position):

    1. ``long``: documents longer than half the rank capacity ``S / (2W)``, or carrying more than
       an eighth of a rank's share of the causal pairs, are cut into ``2W`` near-equal pieces, rank
       i holding pieces i and ``2W-1-i`` (zigzag: equal tokens and equal work on every rank).
    2. the others (each light next to a rank's share) go whole to the rank with the least work
       that still has room for them (longest-processing-time first). Documents shorter than
       ``S / (2W)`` stay whole unless one alone outweighs an eighth of a rank's work (e.g.
       samples of equal short documents, at least 8 per rank, are never cut and send nothing).
    3. what did not fit is cut into contiguous pieces that fill the ranks' remaining room exactly,
       its heavier (later) pieces to the ranks with less work.

    The thresholds are measured choices (docs/benchmarks.md: max/mean pairs <= 1.05 on the
    benchmark mixes); changing them changes every balanced plan, so they are not settings.
    Plans are cached (the reader, the attention side and the metrics ask for the same samples').
    """
    return [list(ranges) for ranges in _balanced_plan(tuple(int(n) for n in doc_lengths), world_size)]


@functools.lru_cache(maxsize=32)
def _balanced_plan(lengths: tuple[int, ...], world_size: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    lengths, w = list(lengths), world_size
    total = sum(lengths)
    if total % w:
        raise ValueError(f"documents of {total} tokens do not split into {w} equal shards")
    cap = total // w
    starts = [0, *itertools.accumulate(lengths)][:-1]  # each document's first token
    target = sum(pair_work(0, n) for n in lengths) / w
    room, work = [cap] * w, [0] * w
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(w)]  # global ranges per rank
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    left: list[int] = []
    for i in order:
        n, s0 = lengths[i], starts[i]
        if n == 0:
            continue
        if 2 * n > cap or pair_work(0, n) * 8 > target:
            shares = _zigzag_pieces(n, w)
            if all(sum(b - a for a, b in shares[r]) <= room[r] for r in range(w)):
                for r in range(w):
                    for a, b in shares[r]:
                        _give(pieces, room, work, r, s0, a, b)
                continue
            left.append(i)
            continue
        fits = [r for r in range(w) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: (work[r], r))
            _give(pieces, room, work, r, s0, 0, n)
        else:
            left.append(i)
    for i in sorted(left, key=lambda i: starts[i]):
        _fill(pieces, room, work, starts[i], lengths[i])
    return tuple(tuple(_merge(sorted(p))) for p in pieces)


def _zigzag_pieces(n: int, w: int) -> list[Ranges]:
    """A document of ``n`` tokens cut in ``2w`` near-equal pieces; rank r gets r and 2w-1-r."""
    cuts = [n * c // (2 * w) for c in range(2 * w + 1)]
    return [[(cuts[r], cuts[r + 1]), (cuts[2 * w - 1 - r], cuts[2 * w - r])] for r in range(w)]


def _give(pieces, room, work, r: int, s0: int, a: int, b: int) -> None:
    if b > a:
        pieces[r].append((s0 + a, s0 + b))
        room[r] -= b - a
        work[r] += pair_work(a, b)


def _fill(pieces, room, work, s0: int, n: int) -> None:
    """Cut a document into the remaining room: later (heavier) pieces to ranks with less work."""
    a = n
    for r in sorted((r for r in range(len(room)) if room[r] > 0), key=lambda r: (work[r], r)):
        if a == 0:
            break
        take = min(room[r], a)
        _give(pieces, room, work, r, s0, a - take, a)
        a -= take
    if a:
        raise AssertionError("balanced plan: the ranks have no room left for a document")


def _merge(ranges: Ranges) -> Ranges:
    """Sorted ranges with touching neighbours joined."""
    out: Ranges = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag", *,
                    doc_lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Global positions of this rank's tokens, shape ``(seq_len // world_size,)``."""
    ranges = shard_ranges(seq_len, rank, world_size, layout, doc_lengths=doc_lengths)
    return torch.cat([torch.arange(a, b) for a, b in ranges])


def _index(x: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def _sample_lengths(segment_ids: torch.Tensor | None, seq_len: int, layout: str) -> list[tuple[int, ...] | None]:
    """Document lengths of each sample of ``segment_ids`` ((S,) or (B, S)); [None] without them."""
    if layout != "balanced":
        return [None]
    if segment_ids is None:
        raise ValueError("the balanced layout needs segment_ids (the full sample's)")
    ids = torch.as_tensor(segment_ids)
    if ids.shape[-1] != seq_len or ids.dim() not in (1, 2):
        raise ValueError(f"segment_ids must be (S,) or (B, S) with S = {seq_len}; got {tuple(ids.shape)}")
    return [document_lengths(row) for row in ids.reshape(-1, seq_len)]


def shard_sequence(x: torch.Tensor, *, dim: int, rank: int, world_size: int, layout: str = "zigzag",
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (a contiguous copy).

    ``segment_ids``: the full sample's, ``(S,)`` or ``(B, S)`` (the balanced layout needs them;
    with ``(B, S)``, dim 0 of ``x`` is the batch and each sample follows its own plan).
    """
    lengths = _sample_lengths(segment_ids, x.shape[dim], layout)
    if len(lengths) == 1:
        return _index(x, dim, shard_ranges(x.shape[dim], rank, world_size, layout, doc_lengths=lengths[0])).contiguous()
    if dim == 0 or x.shape[0] != len(lengths):
        raise ValueError(f"segment_ids of {len(lengths)} samples need x with that batch in dim 0 and dim != 0")
    rows = [_index(x[i:i + 1], dim, shard_ranges(x.shape[dim], rank, world_size, layout, doc_lengths=n))
            for i, n in enumerate(lengths)]
    return torch.cat(rows, dim=0).contiguous()


def unshard_sequence(shards: Sequence[torch.Tensor], *, dim: int, layout: str = "zigzag",
                     segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: ``shards[r]`` is rank r's slice."""
    world_size = len(shards)
    if layout == "balanced":
        seq_len = sum(t.shape[dim] for t in shards)
        lengths = _sample_lengths(segment_ids, seq_len, layout)
        rows = []
        for i, n in enumerate(lengths):
            parts = shards if len(lengths) == 1 else [t[i:i + 1] for t in shards]
            placed = []
            for rank, shard in enumerate(parts):
                offset = 0
                for a, b in shard_ranges(seq_len, rank, world_size, layout, doc_lengths=n):
                    placed.append((a, shard.narrow(dim, offset, b - a)))
                    offset += b - a
            rows.append(torch.cat([t for _, t in sorted(placed, key=lambda p: p[0])], dim=dim))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    per_rank = chunks_per_rank(layout)
    chunks: list[torch.Tensor | None] = [None] * (per_rank * world_size)
    for rank, shard in enumerate(shards):
        if shard.shape[dim] % per_rank:
            raise ValueError(f"shard {rank} has length {shard.shape[dim]}, not divisible by {per_rank}")
        pieces = shard.chunk(per_rank, dim=dim)
        for cid, piece in zip(chunk_ids(rank, world_size, layout), pieces):
            chunks[cid] = piece
    return torch.cat(chunks, dim=dim)


def ulysses_gather_order(ulysses: int, layout: str) -> list[tuple[int, int]]:
    """How a Ulysses group's gathered shards form its ring rank's shard: ``(member, piece)`` in local order.

    cp factors as ``cp = ring * ulysses`` with ``cp_rank = ring_rank * ulysses + member``; the data
    is sharded over the total cp. The ``ulysses`` members of ring rank j together hold exactly ring
    rank j's shard of the same sequence laid out over ``ring`` ranks, with ``piece`` the index of a
    member's chunk in its own local order (:func:`chunk_ids`); writing ``U = ulysses``, ``W = cp``,
    ``R = ring``:

    - contiguous: member u holds chunk ``jU + u``; ring rank j holds chunks ``[jU, (j+1)U)`` of W,
      i.e. its one chunk of R: members in order.
    - zigzag: member u holds chunks ``jU + u`` and ``2W-1-jU-u``; ring rank j holds ring chunks j
      and ``2R-1-j``, i.e. chunks ``[jU, (j+1)U)`` then ``[2W-(j+1)U, 2W-jU)`` of the total
      ``2W``: every member's first piece in member order, then every second piece in reverse
      member order.

    So ring attention over the ring group, on the gathered sequence in this order, is ring
    attention in the same layout, and the data reader's sharding is the same for every factorisation.
    """
    if ulysses < 1:
        raise ValueError(f"ulysses={ulysses} must be >= 1")
    first = [(u, 0) for u in range(ulysses)]
    if chunks_per_rank(layout) == 1:
        return first
    return first + [(u, 1) for u in reversed(range(ulysses))]
