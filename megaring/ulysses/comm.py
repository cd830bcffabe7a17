"""The all-to-all of the Ulysses group: slice i of every rank's send buffer goes to rank i.

``all_to_all(x, axis)`` takes ``x`` of shape ``(U, ...)`` (``U = axis.size``) and returns ``y`` of
the same shape with ``y[i]`` = rank i's ``x[me]``. Its adjoint is the same exchange, so the
autograd function's backward is one all-to-all of the gradient. Bytes sent (all slices but a
rank's own) are counted on the axis's :class:`~megaring.distributed.mesh.Traffic`, and on the
caller's ``traffic`` when given (the trainer's per-step K/V metric, as ring attention does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis, Traffic

KIND = "all_to_all"


def post_all_to_all(x: torch.Tensor, axis: Axis, *, async_op: bool = False, traffic: Traffic | None = None):
    """Start the exchange of ``x`` ``(U, ...)``; returns ``(received, work)`` (``work`` None when done)."""
    if x.shape[0] != axis.size:
        raise ValueError(f"all_to_all over {axis.name} of size {axis.size}: first dim is {x.shape[0]}")
    x = x.contiguous()
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x, group=axis.group, async_op=async_op)
    nbytes = x.numel() * x.element_size() * (axis.size - 1) // axis.size
    axis.traffic.add(KIND, nbytes)
    if traffic is not None:
        traffic.add(KIND, nbytes)
    return out, work


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis: Axis, traffic: Traffic | None):
        ctx.axis, ctx.traffic = axis, traffic
        return post_all_to_all(x, axis, traffic=traffic)[0]

    @staticmethod
    def backward(ctx, grad):
        return post_all_to_all(grad, ctx.axis, traffic=ctx.traffic)[0], None, None


def all_to_all(x: torch.Tensor, axis: Axis, traffic: Traffic | None = None) -> torch.Tensor:
    """``y[i]`` = rank i's ``x[me]``, with autograd; ``x`` itself when the axis has one rank."""
    return x if axis.size == 1 else AllToAll.apply(x, axis, traffic)
