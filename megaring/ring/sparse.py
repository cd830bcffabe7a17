"""Mask-aware ring attention: masks from document positions, K/V sent only where a query sees it.

Used whenever the mask is not the zigzag/contiguous structure the block plan knows
(:mod:`megaring.ring.block_plan`): the balanced layout, explicit ``positions``, or a sliding window.
The route (:mod:`megaring.ring.route`) says, identically on every rank, which rows of which block
travel at each step; this module only orchestrates it.

Forward, at step s a rank holds block ``j = rank - s`` (rows ``carry[j][s]``) when the route
brings it, posts the next transfer (a slice of what it holds), computes the tiles its queries see
(:func:`pair_calls`), and merges them with the float32 online softmax. Steps past the farthest
hop of any block are not run at all.

Backward (one schedule; ``backward="chunked"`` runs it too, its tiles bounded by the settings):
K/V travel the same reduced route again; a block's float32 dK/dV accumulator (its rows
``carry[j][1]``) starts at hop 1, travels with it, and from the block's last hop goes straight
home to its owner, in the same step's batch of transfers::

    step s:  post K/V for step s + 1 | compute dQ, dK/dV of the held block | post dK/dV: next
             hop, or home at the last hop; receive the next block's, and this rank's own at
             step last[rank] | wait
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megaring.distributed.mesh import Axis, Traffic
from megaring.kernels import BlockKernel
from megaring.ring.comm import GRAD_TAG, HOME_TAG, KV_TAG, PeerExchange
from megaring.ring.masks import BlockCall
from megaring.ring.merge import merge_into
from megaring.ring.pieces import Box, block_boxes
from megaring.ring.route import Route
from megaring.ring.settings import RingSettings


class SparseRing:
    """One rank's mask-aware ring for one attention call: route, token metadata, options."""

    def __init__(self, axis: Axis, route: Route, seg: torch.Tensor, pos: torch.Tensor, *, causal: bool,
                 window: int | None, settings: RingSettings, traffic: Traffic | None, memo: dict | None = None):
        self.axis, self.route, self.causal, self.window = axis, route, causal, window
        self.settings, self.traffic = settings, traffic
        self.q_meta = (seg, pos)  # (B, S_local) int64 each, on the device
        # ("boxes", step) -> list[Box] and ("keys", j) -> (seg, pos) of block j: derived from the
        # route alone, so shared by every call with the same route (RouteCache)
        self._memo = {} if memo is None else memo

    def calls(self, step: int) -> Iterator[BlockCall]:
        """Kernel calls at ``step`` against the held block (none when nothing is visible): the
        boxes of :mod:`megaring.ring.pieces`, computed once per step, their masks built lazily."""
        r = self.route
        j = r.src(step)
        if not r.holds(step) or r.visible[j] is None:
            return iter(())
        held = r.carry[j][step]
        if ("boxes", step) not in self._memo:
            self._memo["boxes", step] = block_boxes(r.runs[r.rank], r.runs[j], held, self.q_meta[0].shape[0],
                                                    self.causal, self.window, self.settings)
        return (BlockCall(box.q, box.kv, box.causal, self._mask(j, held, box) if box.masked else None, box.batch)
                for box in self._memo["boxes", step])

    def _mask(self, j: int, held: tuple[int, int], box: Box) -> torch.Tensor:
        """``(B or 1, rows of q, rows of kv)`` bool: who sees whom in a masked box."""
        if ("keys", j) not in self._memo:
            seg, pos = self.route.key_meta(j, (0, self.route.local_len), self.q_meta[0].shape[0])
            self._memo["keys", j] = (seg.to(self.q_meta[0].device), pos.to(self.q_meta[0].device))
        kv = slice(held[0] + box.kv.start, held[0] + box.kv.stop)
        sq, pq = (t[box.batch, box.q, None] for t in self.q_meta)  # (B, tq, 1)
        sk, pk = (t[box.batch, None, kv] for t in self._memo["keys", j])  # (B, 1, nk)
        mask = sq == sk  # (B, tq, nk)
        if self.causal:
            mask &= pk <= pq
        if self.window is not None:
            mask &= (pq - pk < self.window) if self.causal else ((pq - pk).abs() < self.window)
        return mask

    def post_kv(self, ex: PeerExchange, step: int, k, v) -> list[torch.Tensor] | None:
        """Post this step's K/V transfers (a slice of the held block out, the next one in)."""
        r, sends, recvs, nxt = self.route, [], [], None
        nxt_rank, prev_rank = (r.rank + 1) % r.size, (r.rank - 1) % r.size
        if (rows := r.sends(step)) is not None:
            a = rows[0] - r.carry[r.src(step)][step][0]
            sends = [(nxt_rank, _heads_major(t[:, a:a + rows[1] - rows[0]])) for t in (k, v)]
        if (rows := r.receives(step)) is not None:
            nxt = [_empty_heads_major(k, rows[1] - rows[0]) for _ in range(2)]
            recvs = [(prev_rank, t) for t in nxt]
        ex.post(sends, recvs)
        return None if nxt is None else [t.transpose(1, 2) for t in nxt]  # (B, n, H_kv, D) views


def _heads_major(x: torch.Tensor) -> torch.Tensor:
    """(B, n, H, D) -> contiguous (B, H, n, D): the order K/V travel in."""
    return x.transpose(1, 2).contiguous()


def _empty_heads_major(like: torch.Tensor, rows: int, dtype=None) -> torch.Tensor:
    b, _, h, d = like.shape
    return torch.empty(b, h, rows, d, dtype=dtype or like.dtype, device=like.device)


def sparse_forward(ring: SparseRing, kernel: BlockKernel, q, k, v, scale: float):
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device)  # (B, S, H, D)
    lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)  # (B, H, S)
    ex = PeerExchange(ring.axis, KV_TAG, ring.traffic)
    k_cur, v_cur = k, v
    for step in range(ring.route.steps):
        nxt = ring.post_kv(ex, step, k_cur, v_cur)
        for call in ring.calls(step):
            bq = (call.batch, call.q)
            o_b, lse_b = kernel.forward(q[bq], k_cur[call.batch, call.kv], v_cur[call.batch, call.kv],
                                        scale=scale, causal=call.causal, mask=call.mask)
            merge_into(out[bq], lse[call.batch, :, call.q], o_b, lse_b)
        ex.wait()
        if nxt is not None:
            k_cur, v_cur = nxt
    return out.to(q.dtype), lse


def sparse_backward(ring: SparseRing, kernel: BlockKernel, saved):
    """(dq, dk, dv) in the inputs' dtypes; ``saved``: :class:`megaring.ring.backward.Saved`."""
    r, s = ring.route, saved
    kv_ex = PeerExchange(ring.axis, KV_TAG, ring.traffic)
    grad_ex = PeerExchange(ring.axis, GRAD_TAG, ring.traffic)
    home_ex = PeerExchange(ring.axis, HOME_TAG, ring.traffic)
    dq = torch.zeros_like(s.q, dtype=torch.float32)
    dk, dv = torch.zeros_like(s.k, dtype=torch.float32), torch.zeros_like(s.v, dtype=torch.float32)
    k_cur, v_cur, acc, home = s.k, s.v, None, None
    nxt_rank, prev_rank = (r.rank + 1) % r.size, (r.rank - 1) % r.size
    for step in range(r.steps):
        j = r.src(step)
        nxt = ring.post_kv(kv_ex, step, k_cur, v_cur)
        if step >= 1 and r.holds(step) and acc is None:  # hop 1: the accumulator starts here
            acc = [_empty_heads_major(s.k, _rows(r.carry[j][1]), torch.float32).zero_().transpose(1, 2)
                   for _ in range(2)]
        into, off = (dk, dv), 0
        if step >= 1 and acc is not None:
            into, off = acc, r.carry[j][step][0] - r.carry[j][1][0]
        for call in ring.calls(step):
            dq_t, dk_t, dv_t = s.grads(kernel, call, k_cur[call.batch, call.kv], v_cur[call.batch, call.kv])
            dq[call.batch, call.q] += dq_t
            rows = slice(off + call.kv.start, off + call.kv.stop)
            into[0][call.batch, rows] += dk_t
            into[1][call.batch, rows] += dv_t
        sends, recvs, passed, home_sends, home_recvs = [], [], None, [], []
        if step >= 1 and acc is not None:  # on to the next hop, or home from the last one
            to_home = step == r.last[j]
            (home_sends if to_home else sends).extend((j if to_home else nxt_rank, _heads_major(t)) for t in acc)
        if step + 1 >= 2 and (rows := r.receives(step)) is not None:
            passed = [_empty_heads_major(s.k, _rows(r.carry[r.src(step + 1)][1]), torch.float32) for _ in range(2)]
            recvs = [(prev_rank, t) for t in passed]
        if r.last[r.rank] >= 1 and step == r.last[r.rank]:
            home = [_empty_heads_major(s.k, _rows(r.carry[r.rank][1]), torch.float32) for _ in range(2)]
            home_recvs = [((r.rank + step) % r.size, t) for t in home]
        grad_ex.post(sends, recvs)
        home_ex.post(home_sends, home_recvs)
        kv_ex.wait()
        grad_ex.wait()
        home_ex.wait()
        acc = None if passed is None else [t.transpose(1, 2) for t in passed]
        if nxt is not None:
            k_cur, v_cur = nxt
    if home is not None:
        a, b = r.carry[r.rank][1]
        dk[:, a:b] += home[0].transpose(1, 2)
        dv[:, a:b] += home[1].transpose(1, 2)
    return s.cast(dq, dk, dv)


def _rows(span: tuple[int, int]) -> int:
    return span[1] - span[0]
