"""Mask-aware ring attention: masks from document positions, K/V sent only where a query sees it.

Used whenever the mask is not the zigzag/contiguous structure the block plan knows
(:mod:`megaring.ring.plan`): the balanced layout, explicit ``positions``, or a sliding window.
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

from megaring.distributed.mesh import Axis
from megaring.kernels import BlockKernel
from megaring.ring.comm import GRAD_TAG, HOME_TAG, KV_TAG, KVTraffic, PeerExchange
from megaring.ring.masks import BlockCall
from megaring.ring.merge import merge_into
from megaring.ring.route import Route, Rows
from megaring.ring.settings import RingSettings


def pair_calls(rows: Rows, held: tuple[int, int], q_meta, k_meta, causal: bool, window: int | None,
               settings: RingSettings) -> Iterator[BlockCall]:
    """Kernel calls of this rank's queries against a held block (rows ``held`` of its owner).

    ``q_meta``: ``(seg, pos)`` (B, S_local) of the queries; ``k_meta``: of the held rows. Query
    rows are cut into tiles under the mask budget; each tile is narrowed to the rows and keys that
    see each other, and carries no mask when all of them do. ``kv`` slices index the held tensor.
    """
    (seg_q, pos_q), (seg_k, pos_k) = q_meta, k_meta
    ka, kb = max(rows.k[0], held[0]) - held[0], min(rows.k[1], held[1]) - held[0]
    if ka >= kb:
        return
    sk, pk = seg_k[:, None, ka:kb], pos_k[:, None, ka:kb]  # (B, 1, nk)
    tile = max(1, min(settings.mask_tile_rows, settings.mask_entries // (seg_q.shape[0] * (kb - ka))))
    for r0 in range(rows.q[0], rows.q[1], tile):
        r1 = min(rows.q[1], r0 + tile)
        sq, pq = seg_q[:, r0:r1, None], pos_q[:, r0:r1, None]  # (B, tq, 1)
        mask = sq == sk  # (B, tq, nk)
        if causal:
            mask &= pk <= pq
        if window is not None:
            mask &= (pq - pk < window) if causal else ((pq - pk).abs() < window)
        cols = torch.nonzero(mask.any(dim=1).any(dim=0)).reshape(-1)
        if cols.numel() == 0:
            continue
        lines = torch.nonzero(mask.any(dim=2).any(dim=0)).reshape(-1)
        c0, c1, q0, q1 = int(cols[0]), int(cols[-1]) + 1, int(lines[0]), int(lines[-1]) + 1
        sub = mask[:, q0:q1, c0:c1]
        yield BlockCall(slice(r0 + q0, r0 + q1), slice(ka + c0, ka + c1), False,
                        None if bool(sub.all()) else sub)


class SparseRing:
    """One rank's mask-aware ring for one attention call: route, token metadata, options."""

    def __init__(self, axis: Axis, route: Route, seg: torch.Tensor, pos: torch.Tensor, *, causal: bool,
                 window: int | None, settings: RingSettings, traffic: KVTraffic | None):
        self.axis, self.route, self.causal, self.window = axis, route, causal, window
        self.settings, self.traffic = settings, traffic
        self.q_meta = (seg, pos)  # (B, S_local) int64 each, on the device
        self._keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def calls(self, step: int) -> Iterator[BlockCall]:
        """Kernel calls at ``step`` against the held block (none when nothing is visible)."""
        r = self.route
        j = r.src(step)
        if not r.holds(step) or r.visible[j] is None:
            return iter(())
        held = r.carry[j][step]
        if j not in self._keys:
            seg, pos = r.key_meta(j, (0, r.local_len), self.q_meta[0].shape[0])
            self._keys[j] = (seg.to(self.q_meta[0].device), pos.to(self.q_meta[0].device))
        seg_k, pos_k = (t[:, held[0]:held[1]] for t in self._keys[j])
        return pair_calls(r.visible[j], held, self.q_meta, (seg_k, pos_k), self.causal, self.window,
                          self.settings)

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
            o_b, lse_b = kernel.forward(q[:, call.q], k_cur[:, call.kv], v_cur[:, call.kv],
                                        scale=scale, causal=call.causal, mask=call.mask)
            merge_into(out[:, call.q], lse[:, :, call.q], o_b, lse_b)
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
            dq_t, dk_t, dv_t = s.grads(kernel, call, k_cur[:, call.kv], v_cur[:, call.kv])
            dq[:, call.q] += dq_t
            rows = slice(off + call.kv.start, off + call.kv.stop)
            into[0][:, rows] += dk_t
            into[1][:, rows] += dv_t
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
