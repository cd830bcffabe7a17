"""Context attention over cp = ring x Ulysses: head all-to-all inside, ring attention across.

For a Ulysses group of ``U`` ranks (``cp_ulysses``) inside a ring of ``R`` groups (``cp_ring``):

1. one all-to-all of q, k and v together turns each rank's ``(B, S/cp, H, D)`` sequence shard
   into a head shard ``(B, U S/cp, H/U, D)`` of its ring rank's longer shard; segment ids ride a
   second all-to-all, posted first. The gathered pieces are put in the ring's local order
   (:func:`megaring.layout.ulysses_gather_order`), so the data stays sharded over the total cp;
2. :func:`megaring.ring_attention` runs over the ring group on those heads;
3. one all-to-all brings the output back to ``(B, S/cp, H, D)``.

Autograd runs through all three (the all-to-all is its own adjoint). With ``U = 1`` this is
``ring_attention`` itself, bit for bit.
"""

from __future__ import annotations

import torch

from megaring.distributed.mesh import Axis
from megaring.layout import chunks_per_rank, ulysses_gather_order
from megaring.ring.attention import cp_axis, input_problems, ring_attention
from megaring.ulysses.comm import all_to_all, post_all_to_all
from megaring.ulysses.heads import head_problems, kv_send_index


def _axes(ulysses_group, ring_group) -> tuple[Axis, Axis]:
    if ulysses_group is None:
        return Axis.single("cp_ulysses"), cp_axis(ring_group)
    u = ulysses_group if isinstance(ulysses_group, Axis) else Axis.of_group(ulysses_group, "cp_ulysses")
    if ring_group is None:
        return u, Axis.single("cp_ring")
    return u, (ring_group if isinstance(ring_group, Axis) else Axis.of_group(ring_group, "cp_ring"))


def _to_heads(x: torch.Tensor, order, per_rank: int) -> torch.Tensor:
    """Received ``(U, B, S, h, D)`` (slice u: member u's shard) -> ``(B, U S, h, D)`` in ring order."""
    u, b, s, h, d = x.shape
    pieces = x.view(u, b, per_rank, s // per_rank, h, d)
    return torch.cat([pieces[m, :, p] for m, p in order], dim=1)


def _to_sequence(out: torch.Tensor, order, per_rank: int, ulysses: int) -> torch.Tensor:
    """``(B, U S, h, D)`` in ring order -> ``(U, B, S, h, D)``, slice u: member u's pieces."""
    pieces = out.chunk(len(order), dim=1)
    mine = {key: piece for key, piece in zip(order, pieces)}
    return torch.stack([torch.cat([mine[(m, p)] for p in range(per_rank)], dim=1) for m in range(ulysses)])


def _gather_segments(seg: torch.Tensor, axis: Axis, traffic):
    """Post the all-to-all that gives every member all members' ``(B, S)`` segment ids."""
    return post_all_to_all(seg.to(torch.int64).expand(axis.size, *seg.shape), axis, async_op=True, traffic=traffic)


def context_attention(q, k, v, *, ulysses_group=None, ring_group=None, causal: bool = True,
                      softmax_scale: float | None = None, segment_ids=None, layout: str = "zigzag",
                      kernel=None, backward: str = "whole", settings=None, traffic=None):
    """Exact attention over a sequence sharded across cp = ring x Ulysses, in ``layout`` over the total cp.

    q: (B, S_local, H, D); k, v: (B, S_local, H_kv, D); segment_ids: optional (B, S_local) integers.
    ``ulysses_group`` / ``ring_group``: process groups or :class:`~megaring.distributed.Axis`
    (``mesh.cp_ulysses``, ``mesh.cp_ring``); cp rank = ring rank * U + Ulysses rank. ``None``
    ulysses: pure ring (``ring_attention(group=ring_group)``); ``None`` ring with a Ulysses group:
    pure Ulysses. ``H`` must divide by U; ``H_kv`` must be a multiple or a divisor of U
    (:mod:`megaring.ulysses.heads`). ``traffic`` counts both the all-to-all and the ring bytes this rank
    sends. The rest as :func:`~megaring.ring_attention`. Returns (B, S_local, H, D).
    """
    u_axis, r_axis = _axes(ulysses_group, ring_group)
    ring_kw = dict(causal=causal, softmax_scale=softmax_scale, layout=layout, kernel=kernel, backward=backward,
                   settings=settings, traffic=traffic)
    if u_axis.size == 1:
        return ring_attention(q, k, v, group=r_axis, segment_ids=segment_ids, **ring_kw)
    problems = input_problems(q, k, v, segment_ids, layout, backward)
    if q.dim() == 4 and k.dim() == 4:
        problems += head_problems(q.shape[2], k.shape[2], u_axis.size, where="local")
    if problems:
        raise ValueError("context_attention: " + "; ".join(problems))
    n, per_rank = u_axis.size, chunks_per_rank(layout)
    order = ulysses_gather_order(n, layout)
    seg = None
    if segment_ids is not None:
        seg_parts, seg_work = _gather_segments(segment_ids, u_axis, traffic)
    b, s, h, d = q.shape
    if (index := kv_send_index(k.shape[2], n)) is not None:
        k, v = k.index_select(2, index.to(k.device)), v.index_select(2, index.to(v.device))
    hq, hk = h // n, k.shape[2] // n
    qkv = torch.cat([t.reshape(b, s, n, -1, d) for t in (q, k, v)], dim=3)  # (B, S, U, hq + 2 hk, D)
    qkv = _to_heads(all_to_all(qkv.permute(2, 0, 1, 3, 4), u_axis, traffic), order, per_rank)  # (B, U S, hq+2hk, D)
    if segment_ids is not None:
        seg_work.wait()
        seg = _to_heads(seg_parts[..., None, None], order, per_rank)[..., 0, 0]  # (B, U S)
    q_h, k_h, v_h = qkv.split([hq, hk, hk], dim=2)
    out = ring_attention(q_h, k_h, v_h, group=r_axis, segment_ids=seg, **ring_kw)  # (B, U S, hq, D)
    back = all_to_all(_to_sequence(out, order, per_rank, n), u_axis, traffic)  # (U, B, S, hq, D): slice u = heads of u
    return back.permute(1, 2, 0, 3, 4).reshape(b, s, h, d)
