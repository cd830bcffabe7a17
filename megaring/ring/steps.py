"""The ring's steps as one rank sees them: its group, rank and size, and what it computes when."""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist

from megaring.ring.schedule import ALL, BlockCall, BlockPlan, block_calls, plan_block


class Ring:
    """Facts shared by forward and backward: group, rank, size and the block plan."""

    def __init__(self, group, causal: bool, layout: str, local_len: int):
        self.group, self.causal, self.layout, self.local_len = group, causal, layout, local_len
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.size > 1 else 0

    def plan(self, step: int) -> BlockPlan | None:
        src = (self.rank - step) % self.size
        return plan_block(self.rank, src, self.size, self.local_len, causal=self.causal, layout=self.layout)

    def calls(self, step: int, seg_q, seg_k, **tiles) -> Iterator[BlockCall]:
        """This step's kernel calls (document masks tiled; fully masked blocks and tiles left out);
        ``tiles``: the ``kv`` and ``q_tiles`` of :func:`block_calls`."""
        return block_calls(self.plan(step), seg_q, seg_k, length=self.local_len if tiles else None, **tiles)


def single_call(ring: Ring, seg) -> BlockCall | None:
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
