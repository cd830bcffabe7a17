"""Which part of each (query shard, key shard) pair a rank computes at each ring step.

At step s, rank r holds the keys of rank j = (r - s) mod W. With a causal mask:

- contiguous layout: j < r all visible; j == r the causal diagonal; j > r nothing.
- zigzag layout (rank r holds chunks r and 2W-1-r, each of c tokens):
  j == r: the local causal block (local order follows global order);
  j < r:  every query sees the first key chunk (chunk j), none sees chunk 2W-1-j;
  j > r:  only the second query chunk (2W-1-r) sees the keys, and it sees all of them.
  Each of these costs 2c*c query-key pairs (the diagonal skips its masked half), so
  every rank does the same work at every step.

:class:`Ring` is one rank's view of the whole ring, shared by forward and backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from megaring.distributed.mesh import Axis, Traffic
from megaring.ring.masks import BlockCall, block_calls
from megaring.ring.settings import RingSettings

ALL = slice(None)


@dataclass(frozen=True)
class BlockPlan:
    q: slice  # local query rows to compute
    kv: slice  # rows of the key/value block they attend to
    causal: bool  # square diagonal block with a lower-triangular mask


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


@dataclass(frozen=True)
class Ring:
    """One rank's view of the ring: its cp axis (the one source of rank and size), the mask kind,
    the layout, the local shard length and the tiling settings (resolved for the device)."""

    axis: Axis
    causal: bool
    layout: str
    local_len: int
    settings: RingSettings
    traffic: Traffic | None = None  # counts the bytes this rank sends, when given

    @property
    def size(self) -> int:
        return self.axis.size

    @property
    def rank(self) -> int:
        return self.axis.rank

    def plan(self, step: int) -> BlockPlan | None:
        src = (self.rank - step) % self.size
        return plan_block(self.rank, src, self.size, self.local_len, causal=self.causal, layout=self.layout)

    def calls(self, step: int, seg_q, seg_k, **tiles) -> Iterator[BlockCall]:
        """This step's kernel calls (document masks tiled; fully masked blocks and tiles left out);
        ``tiles``: the ``kv`` and ``q_tiles`` of :func:`~megaring.ring.masks.block_calls`."""
        return block_calls(self.plan(step), seg_q, seg_k, self.settings,
                           length=self.local_len if tiles else None, **tiles)

    def single_call(self, seg) -> BlockCall | None:
        """With one rank and one unmasked-or-single-tile call: no ring, no merge, one kernel call.

        Bit-identical to the ring path (merging one block into an empty accumulator returns it as
        is), without its float32 buffers and bookkeeping.
        """
        if self.size > 1:
            return None
        calls = self.calls(0, seg, seg)
        call = next(calls, None)
        whole = call is not None and call.q == ALL and call.kv == ALL and next(calls, None) is None
        return call if whole else None
