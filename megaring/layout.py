"""Where each cp rank's tokens sit in the global sequence: the layouts data and attention share.

A leaf module (torch only): the data reader shards samples by it and ring attention computes by
it, so neither has to import the other. Two layouts of a global sequence of length S over a cp
group of size W:

- ``"zigzag"``: the sequence is cut in ``2*W`` equal chunks; rank r holds chunks
  ``r`` and ``2W-1-r``, concatenated in that order. Under a causal mask every rank then
  does the same amount of attention work.
- ``"contiguous"``: rank r holds chunk r of W.

Everything here is pure indexing: no communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunks_per_rank(layout: str) -> int:
    """How many chunks of the global sequence one rank holds (its local length must divide by it)."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into."""
    return chunks_per_rank(layout) * world_size


def length_problem(seq_len: int, world_size: int, layout: str) -> str | None:
    """Why a global sequence of ``seq_len`` tokens cannot be laid out over ``world_size`` cp ranks, or None.

    The one statement of the rule: the length must split into :func:`num_chunks` equal chunks.
    """
    n = num_chunks(world_size, layout)
    if seq_len % n == 0:
        return None
    name = "2*cp" if layout == "zigzag" else "cp"
    return f"sequence length {seq_len} is not divisible by {name}={n} (cp={world_size}, {layout} layout)"


def chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The chunk indices rank ``rank`` holds, in local order."""
    check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of size {world_size}")
    if layout == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def shard_ranges(seq_len: int, rank: int, world_size: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """Half-open global ranges ``[start, end)`` of the tokens rank ``rank`` holds, in local order."""
    problem = length_problem(seq_len, world_size, layout)
    if problem:
        raise ValueError(problem)
    chunk = seq_len // num_chunks(world_size, layout)
    return [(c * chunk, (c + 1) * chunk) for c in chunk_ids(rank, world_size, layout)]


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions of this rank's tokens, shape ``(seq_len // world_size,)``."""
    return torch.cat([torch.arange(a, b) for a, b in shard_ranges(seq_len, rank, world_size, layout)])


def shard_sequence(x: torch.Tensor, *, dim: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (a contiguous copy)."""
    ranges = shard_ranges(x.shape[dim], rank, world_size, layout)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim).contiguous()


def unshard_sequence(shards: Sequence[torch.Tensor], *, dim: int, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: ``shards[r]`` is rank r's slice."""
    world_size = len(shards)
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
