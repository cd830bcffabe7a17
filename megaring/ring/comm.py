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
from megaring.distributed.mesh import Axis, Traffic

# One tag per kind of message, so that messages between a pair of ranks match one to one.
KV_TAG, GRAD_TAG, SEG_TAG, HOME_TAG = 11, 12, 13, 14
TAG_NAMES = {KV_TAG: "K/V", GRAD_TAG: "dK/dV", SEG_TAG: "segment ids", HOME_TAG: "dK/dV home"}  # for hang reports


KIND = "ring_p2p"  # the kind of message ring attention's transfers count as (Traffic)


def count_sent(axis: Axis, traffic: Traffic | None, tensors: list[torch.Tensor]) -> None:
    """Add the bytes of ``tensors`` to the axis's counter and to the caller's ``traffic``, if any."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    axis.traffic.add(KIND, nbytes)
    if traffic is not None:
        traffic.add(KIND, nbytes)


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

    def __init__(self, axis: Axis, tag: int = 0, traffic: Traffic | None = None):
        self.axis, self.group = axis, axis.group
        self.traffic = traffic  # the caller's counter (trainer metrics), when given; the axis has its own
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
        count_sent(self.axis, self.traffic, tensors)
        buffers = [torch.empty_like(t) for t in tensors]  # the same strides as what is sent
        ops = [dist.P2POp(dist.isend, memory_order(t), self.next, self.group, self.tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, memory_order(b), self.prev, self.group, self.tag) for b in buffers]
        with torch.profiler.record_function("ring.comm.send_recv"):  # a named region in profiles
            self._works = dist.batch_isend_irecv(ops)
        self._sending = tensors  # alive until sent, even where dense() made a copy
        return buffers

    def wait(self) -> None:
        what = (f"ring {TAG_NAMES.get(self.tag, self.tag)} recv from rank {self.prev}, send to rank {self.next}, "
                f"at ring step {self.ring_step}")
        peers = tuple(sorted({self.prev, self.next}))
        with torch.profiler.record_function("ring.comm.wait"), FLIGHT.waiting(what, peers=peers):
            for work in self._works:
                work.wait()
        self._works, self._sending = [], []
        self.ring_step += 1


class PeerExchange:
    """One batch of point-to-point transfers of one kind (``tag``) with any ranks of ``axis``.

    The mask-aware ring's schedule (:mod:`megaring.ring.route`) says which rank sends what to
    whom at each step; every rank derives it from the same data, so the sends and receives of a
    batch match one to one. ``post(sends, recvs)`` takes ``(axis rank, tensor)`` pairs (receive
    buffers allocated by the caller) and ``wait()`` completes them; an empty batch posts nothing.
    """

    def __init__(self, axis: Axis, tag: int, traffic: Traffic | None = None):
        self.axis, self.tag, self.traffic = axis, tag, traffic
        self._works: list = []
        self._sending: list[torch.Tensor] = []
        self.peers: list[int] = []  # axis ranks of the batch in flight (for hang reports)

    def post(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> None:
        if self._works:
            raise RuntimeError("PeerExchange.post called twice without wait()")
        sends = [(peer, dense(t)) for peer, t in sends]
        count_sent(self.axis, self.traffic, [t for _, t in sends])
        ops = [dist.P2POp(dist.isend, memory_order(t), self.axis.ranks[peer], self.axis.group, self.tag)
               for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, memory_order(b), self.axis.ranks[peer], self.axis.group, self.tag)
                for peer, b in recvs]
        if ops:
            self._works = dist.batch_isend_irecv(ops)
        self._sending = [t for _, t in sends]
        self.peers = sorted({peer for peer, _ in sends} | {peer for peer, _ in recvs})

    def wait(self) -> None:
        peers = tuple(sorted({self.axis.ranks[p] for p in self.peers}))
        with FLIGHT.waiting(f"ring {TAG_NAMES.get(self.tag, self.tag)} exchange with ranks {list(peers)}", peers=peers):
            for work in self._works:
                work.wait()
        self._works, self._sending = [], []
