"""Point-to-point ring communication: send to the next rank, receive from the previous one.

``RingComm.send_recv`` posts the transfers and returns the receive buffers at once, so the
caller can compute on the current block while the next one is in flight; ``wait``
completes them. Every rank posts its transfers in the same program order, and each kind of
message has its own tag, so messages between a pair of ranks match one to one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaring.distributed.flight import FLIGHT
from megaring.distributed.mesh import Axis

# One tag per kind of message, so that messages between a pair of ranks match one to one.
KV_TAG, GRAD_TAG, SEG_TAG = 11, 12, 13
TAG_NAMES = {KV_TAG: "K/V", GRAD_TAG: "dK/dV", SEG_TAG: "segment ids"}  # for hang reports


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its dims permuted into memory order: a contiguous view (no copy) when ``t`` is dense.

    Lets the ring send tensors in whatever dense layout they have, e.g. ``(B, S, H, D)`` views of
    heads-major ``(B, H, S, D)`` memory, without copying them to the default layout first.
    """
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    return t.permute(order)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its memory is dense in some dim order, else a contiguous copy."""
    return t if memory_order(t).is_contiguous() else t.contiguous()


class RingComm:
    """Transfers of one kind (``tag``) around the ring of ``axis``: to the next rank, from the previous."""

    def __init__(self, axis: Axis, tag: int = 0):
        self.group = axis.group
        self.tag = tag
        self.next = axis.ranks[(axis.rank + 1) % axis.size]  # global ranks, as P2POp wants them
        self.prev = axis.ranks[(axis.rank - 1) % axis.size]
        self._works: list = []
        self._sending: list[torch.Tensor] = []
        self.ring_step = 0  # transfers completed: the ring step a hang report names

    def send_recv(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Post sends of ``tensors`` to the next rank; return buffers being filled from the previous one."""
        if self._works:
            raise RuntimeError("RingComm.send_recv called twice without wait()")
        tensors = [dense(t) for t in tensors]
        buffers = [torch.empty_like(t) for t in tensors]  # the same strides as what is sent
        ops = [dist.P2POp(dist.isend, memory_order(t), self.next, self.group, self.tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, memory_order(b), self.prev, self.group, self.tag) for b in buffers]
        self._works = dist.batch_isend_irecv(ops)
        self._sending = tensors  # alive until sent, even where dense() made a copy
        return buffers

    def wait(self) -> None:
        what = (f"ring {TAG_NAMES.get(self.tag, self.tag)} recv from rank {self.prev}, send to rank {self.next}, "
                f"at ring step {self.ring_step}")
        with FLIGHT.waiting(what, peers=tuple(sorted({self.prev, self.next}))):
            for work in self._works:
                work.wait()
        self._works, self._sending = [], []
        self.ring_step += 1
