"""Autograd communication regions of tensor and sequence parallelism (Megatron's names).

Each region is an identity in one direction and a collective in the other, so that the
forward and backward of a tp block each communicate once. Every function takes the tp
:class:`~megaring.distributed.mesh.Axis` explicitly and is a no-op when ``axis.size == 1``.

Tensor layout: activations are ``(B, S, ...)``; the tp region splits the last dim, the
sequence-parallel region splits the sequence dim ``SEQ_DIM = 1``.

=========================================  ====================  =======================
region                                     forward               backward
=========================================  ====================  =======================
copy_to_tensor_model_parallel_region       identity              all-reduce
reduce_from_tensor_model_parallel_region   all-reduce            identity
scatter_to_tensor_model_parallel_region    split last dim        all-gather last dim
gather_from_tensor_model_parallel_region   all-gather last dim   split last dim
scatter_to_sequence_parallel_region        split seq dim         all-gather seq dim
gather_from_sequence_parallel_region       all-gather seq dim    reduce-scatter seq dim
reduce_scatter_to_sequence_parallel_region reduce-scatter seq    all-gather seq dim
=========================================  ====================  =======================
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis

SEQ_DIM = 1
# Newer torch renames reduce_scatter_tensor to reduce_scatter_single (same arguments).
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- plain collectives (no autograd) -------------------------------------------------------

def all_reduce(x: torch.Tensor, axis: Axis, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out-of-place all-reduce over ``axis`` (the input may be saved by autograd elsewhere)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=axis.group)
    return out


def all_gather_list(x: torch.Tensor, axis: Axis) -> list[torch.Tensor]:
    """Every rank's ``x`` (equal shapes), in group-rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x, group=axis.group)
    return parts


def gather_list_to_first(x: torch.Tensor, axis: Axis) -> list[torch.Tensor] | None:
    """Every rank's ``x`` (equal shapes) on the group's first rank, in group-rank order; None elsewhere."""
    x = x.contiguous()
    first = axis.rank == 0
    parts = [torch.empty_like(x) for _ in range(axis.size)] if first else None
    dist.gather(x, parts, dst=axis.ranks[0], group=axis.group)
    return parts


def all_gather_along(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    return torch.cat(all_gather_list(x, axis), dim=dim)


def split_along(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """This rank's equal part of ``x`` along ``dim``."""
    if x.shape[dim] % axis.size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {axis.name}={axis.size}")
    return x.chunk(axis.size, dim=dim)[axis.rank].contiguous()


def reduce_scatter_along(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """Sum over ranks, then keep this rank's equal part along ``dim``."""
    if x.shape[dim] % axis.size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {axis.name}={axis.size}")
    stacked = x.movedim(dim, 0).contiguous()  # (size * n, ...): rank r's part is rows r*n:(r+1)*n
    out = stacked.new_empty((stacked.shape[0] // axis.size, *stacked.shape[1:]))
    _reduce_scatter_single(out, stacked, group=axis.group)
    return out.movedim(0, dim).contiguous()


# --- autograd regions ------------------------------------------------------------------------

class _CopyToTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.axis), None


class _ReduceFromTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        return all_reduce(x, axis)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return split_along(x, -1, axis)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, -1, ctx.axis), None


class _GatherFromTensorModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return all_gather_along(x, -1, axis)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, -1, ctx.axis), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return split_along(x, SEQ_DIM, axis)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.axis), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, tensor_parallel_output_grad):
        ctx.axis, ctx.tensor_parallel_output_grad = axis, tensor_parallel_output_grad
        return all_gather_along(x, SEQ_DIM, axis)

    @staticmethod
    def backward(ctx, grad):
        # Consumed by a tp region, each rank's grad is a partial sum: reduce-scatter it.
        # Consumed by replicated code, the grad is already whole: just keep our part.
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter_along(grad, SEQ_DIM, ctx.axis), None, None
        return split_along(grad, SEQ_DIM, ctx.axis), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return reduce_scatter_along(x, SEQ_DIM, axis)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.axis), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Enter a tp region with a replicated input: identity forward, all-reduce the grad."""
    return x if axis.size == 1 else _CopyToTensorModelParallelRegion.apply(x, axis)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Leave a tp region with partial sums: all-reduce forward, identity backward."""
    return x if axis.size == 1 else _ReduceFromTensorModelParallelRegion.apply(x, axis)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Keep this rank's slice of the last dim; all-gather the grad."""
    return x if axis.size == 1 else _ScatterToTensorModelParallelRegion.apply(x, axis)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """All-gather the last dim; keep this rank's slice of the grad."""
    return x if axis.size == 1 else _GatherFromTensorModelParallelRegion.apply(x, axis)


def scatter_to_sequence_parallel_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Keep this rank's slice of the sequence; all-gather the grad."""
    return x if axis.size == 1 else _ScatterToSequenceParallelRegion.apply(x, axis)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, axis: Axis, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence; reduce-scatter the grad (or split it when it is not partial)."""
    if axis.size == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, axis, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Leave a tp region into the sequence-parallel one: reduce-scatter forward, all-gather grad."""
    return x if axis.size == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, axis)
