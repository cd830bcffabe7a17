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

from dataclasses import dataclass


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
