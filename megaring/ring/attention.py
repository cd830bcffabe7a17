"""Ring attention: exact attention over a sequence sharded across a cp process group.

Forward: K/V blocks (with ``H_kv`` heads, never expanded) travel around the ring; the next
block's transfer is posted before the current block is computed, and block results are
merged with a float32 online softmax. The backward (:mod:`megaring.ring.backward`) runs a second
ring. The autograd function only orchestrates: kernels compute, :class:`RingComm` communicates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis, Traffic
from megaring.kernels import BlockKernel, select_kernel
from megaring.layout import LAYOUTS, chunks_per_rank, shard_positions
from megaring.ring.agree import CallSignature, check_agreement
from megaring.ring.backward import BACKWARDS, Saved
from megaring.ring.block_plan import Ring
from megaring.ring.comm import KV_TAG, RingComm, dense
from megaring.ring.merge import merge_into
from megaring.ring.route import RouteCache, build_route, gather_runs, local_runs
from megaring.ring.settings import RingSettings
from megaring.ring.sparse import SparseRing, sparse_backward, sparse_forward


def _ring_forward(ring: Ring, kernel: BlockKernel, q, k, v, seg, scale):
    if (call := ring.single_call(seg)) is not None:
        out, lse = kernel.forward(q, k, v, scale=scale, causal=call.causal, mask=call.mask)
        return out.to(q.dtype), lse
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device)  # (B, S, H, D)
    lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)  # (B, H, S)
    comm = RingComm(ring.axis, KV_TAG, ring.traffic) if ring.size > 1 else None
    k_cur, v_cur, seg_cur = k, v, seg
    for step in range(ring.size):
        if step < ring.size - 1:
            nxt = comm.send_recv([k_cur, v_cur] + ([seg_cur] if seg is not None else []))
        for call in ring.calls(step, seg, seg_cur):
            o_b, lse_b = kernel.forward(q[:, call.q], k_cur[:, call.kv], v_cur[:, call.kv],
                                        scale=scale, causal=call.causal, mask=call.mask)
            merge_into(out[:, call.q], lse[:, :, call.q], o_b, lse_b)
        if step < ring.size - 1:
            comm.wait()
            k_cur, v_cur = nxt[0], nxt[1]
            seg_cur = nxt[2] if seg is not None else None
    return out.to(q.dtype), lse


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, ring: Ring, scale: float, kernel: BlockKernel, backward: str):
        with torch.profiler.record_function("ring_attention.forward"):  # kernels and ring.comm.* inside
            out, lse = _ring_forward(ring, kernel, q, k, v, segment_ids, scale)
        ctx.save_for_backward(q, k, v, out, lse, segment_ids)
        ctx.ring, ctx.kernel, ctx.scale, ctx.backward = ring, kernel, scale, BACKWARDS[backward]
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seg = ctx.saved_tensors
        saved = Saved(dense(dout), q, k, v, out, lse, seg, ctx.scale)
        with torch.profiler.record_function("ring_attention.backward"):
            dq, dk, dv = ctx.backward(ctx.ring, ctx.kernel, saved)
        return dq, dk, dv, None, None, None, None, None


class SparseRingAttentionFunction(torch.autograd.Function):
    """The mask-aware ring (:mod:`megaring.ring.sparse`): positions, windows, the balanced layout."""

    @staticmethod
    def forward(ctx, q, k, v, ring: SparseRing, scale: float, kernel: BlockKernel):
        out, lse = sparse_forward(ring, kernel, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.kernel, ctx.scale = ring, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        saved = Saved(dense(dout), q, k, v, out, lse, None, ctx.scale)
        dq, dk, dv = sparse_backward(ctx.ring, ctx.kernel, saved)
        return dq, dk, dv, None, None, None


def heads_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, S, H, D)`` as a view of ``(B, H, S, D)`` memory (a copy only if not already so).

    The fused attention kernels take ``(B, H, S, D)`` and read it fastest when each head's rows
    are contiguous; the ring sends these tensors in their own memory order.
    """
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def check_inputs(q, k, v, segment_ids, layout: str, backward: str = "whole", positions=None,
                 window: int | None = None) -> None:
    """Raise one ValueError naming every problem with the inputs (before any communication)."""
    problems = input_problems(q, k, v, segment_ids, layout, backward, positions, window)
    if problems:
        raise ValueError("ring_attention: " + "; ".join(problems))


def input_problems(q, k, v, segment_ids, layout: str, backward: str = "whole", positions=None,
                   window: int | None = None) -> list[str]:
    """Every problem with the inputs of :func:`ring_attention` (empty when they are fine)."""
    if layout not in LAYOUTS:
        raise ValueError(f"ring_attention: layout must be one of {LAYOUTS}, got {layout!r}")
    problems = []
    if backward not in BACKWARDS:
        problems.append(f"backward={backward!r} must be one of {sorted(BACKWARDS)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, local_seq, heads, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        problems.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        problems.append(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, local_seq and head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        problems.append(f"n_heads={q.shape[2]} must be a multiple of n_kv_heads={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        problems.append(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        problems.append(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[1] % chunks_per_rank(layout):
        problems.append(f"local_seq={q.shape[1]} must be divisible by {chunks_per_rank(layout)} "
                        f"with the {layout} layout (chunks per rank)")
    if layout == "balanced" and positions is None:
        problems.append("the balanced layout needs positions (each token's position in its document)")
    if window is not None and (not isinstance(window, int) or window < 1):
        problems.append(f"window={window!r} must be an integer >= 1 or None")
    for name, ids in (("positions", positions), ("segment_ids", segment_ids)):
        problems += _per_token_problems(name, ids, tuple(q.shape[:2]))
    return problems


def _per_token_problems(name: str, ids, shape: tuple[int, ...]) -> list[str]:
    """An optional ``(batch, local_seq)`` integer tensor of per-token ids: wrong shape or dtype."""
    if ids is None:
        return []
    out = []
    if tuple(ids.shape) != shape:
        out.append(f"{name} must have shape (batch, local_seq) = {shape}; got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        out.append(f"{name} must be integers; got {ids.dtype}")
    return out


def cp_axis(group) -> Axis:
    """The ring's axis: an :class:`Axis` as given, a process group's, or one process for ``None``.

    ``None`` means plain attention on this process's whole sequence; inside a job of several
    processes that is almost always a forgotten argument, so it is refused there.
    """
    if isinstance(group, Axis):
        return group
    if group is not None:
        return Axis.of_group(group, "cp")
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("ring_attention: group=None in a job of several processes; pass the cp process "
                         "group (or its Axis), or Axis.single('cp') for attention on this process alone")
    return Axis.single("cp")


@torch.compiler.disable  # opaque to torch.compile: the one graph break of a compiled block
def ring_attention(q, k, v, *, group=None, causal: bool = True, softmax_scale: float | None = None,
                   segment_ids=None, positions=None, window: int | None = None, layout: str = "zigzag",
                   kernel: str | BlockKernel | None = None, backward: str = "whole",
                   settings: RingSettings | None = None, traffic: Traffic | None = None,
                   routes: RouteCache | None = None):
    """Exact attention over a sequence sharded across ``group`` in ``layout``.

    q: (B, S_local, H, D); k, v: (B, S_local, H_kv, D); segment_ids: optional (B, S_local)
    integers, a query attends only to keys of its own segment (and, if ``causal``, at a
    global position not after its own). ``positions``: optional (B, S_local) integers, each
    token's position inside its document (as the data reader returns them): a query at ``p``
    then sees a key at ``p'`` of its segment iff ``p' <= p`` (causal) and, with ``window=W``,
    ``p - p' < W`` (``|p - p'| < W`` without ``causal``). Positions make any layout exact and are
    required by ``layout="balanced"``; with them, or a window, the mask-aware ring runs
    (:mod:`megaring.ring.sparse`: K/V travel only as far as a query sees them, steps with nothing
    visible are skipped). ``traffic``: a :class:`~megaring.distributed.mesh.Traffic` that counts the
    bytes this rank sends. ``group``: the cp process group or its
    :class:`~megaring.distributed.Axis`; ``None`` only without torch.distributed (or with one
    process): plain attention. ``kernel``: a name from ``megaring.kernels``, a kernel instance, or
    None (automatic). ``backward``: ``"whole"`` (double-buffered blocks, fastest) or ``"chunked"``
    (blocks in tiles and chunks, least memory). ``settings``: tile and chunk sizes
    (:class:`RingSettings`; None: defaults). ``routes``: a
    :class:`~megaring.ring.route.RouteCache` that keeps the mask-aware ring's route while the same
    ``segment_ids`` / ``positions`` tensors come back (the layers of one forward). Returns
    (B, S_local, H, D).

    Every rank of the ring must pass the same shapes and flags: the first call with a signature
    checks that with one tiny all-gather (:mod:`megaring.ring.agree`) and raises ValueError on every
    rank when they differ. NaN or inf in the inputs propagate to the outputs they reach.
    """
    check_inputs(q, k, v, segment_ids, layout, backward, positions, window)
    settings = (settings or RingSettings()).for_device(q.device.type)
    axis = cp_axis(group)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    check_agreement(axis, CallSignature.of(q, k, causal=causal, layout=layout, backward=backward, window=window,
                                           segment_ids=segment_ids, positions=positions, scale=scale), q.device)
    seg = None if segment_ids is None else segment_ids.to(torch.int64).contiguous()
    if positions is not None or window is not None or layout == "balanced":
        ring = sparse_ring(axis, q, segment_ids, positions, causal=causal, window=window, layout=layout,
                           settings=settings, traffic=traffic, routes=routes)
        block_kernel = select_kernel(kernel, q, needs_mask=True)
        return SparseRingAttentionFunction.apply(heads_major(q), heads_major(k), heads_major(v), ring,
                                                 scale, block_kernel)
    ring = Ring(axis, causal, layout, q.shape[1], settings, traffic)
    block_kernel = select_kernel(kernel, q, needs_mask=segment_ids is not None)
    return RingAttentionFunction.apply(heads_major(q), heads_major(k), heads_major(v), seg,
                                       ring, scale, block_kernel, backward)


def sparse_ring(axis: Axis, q, segment_ids, positions, *, causal: bool, window: int | None, layout: str,
                settings: RingSettings, traffic: Traffic | None, routes: RouteCache | None = None) -> SparseRing:
    """The mask-aware ring of this call: token metadata, one all-gather of runs, the route
    (``routes``: reused from the last call with the same id tensors)."""
    def build():
        b, s = q.shape[:2]
        pos = positions
        if pos is None:  # a window on zigzag / contiguous: global positions suffice
            pos = shard_positions(s * axis.size, axis.rank, axis.size, layout).expand(b, -1)
        pos = pos.to(device=q.device, dtype=torch.int64).contiguous()
        seg = torch.zeros(b, s, dtype=torch.int64, device=q.device) if segment_ids is None else (
            segment_ids.to(device=q.device, dtype=torch.int64).contiguous())
        runs = gather_runs(axis, local_runs(seg, pos))
        return build_route(runs, axis.rank, s, causal, window), seg, pos, {}

    key = (axis.name, axis.ranks, axis.rank, causal, window, layout, tuple(q.shape[:2]), q.device, settings)
    route, seg, pos, memo = build() if routes is None else routes.get((segment_ids, positions), key, build)
    return SparseRing(axis, route, seg, pos, causal=causal, window=window, settings=settings, traffic=traffic,
                      memo=memo)
