"""Tensor-parallel layers (Megatron's names): column- and row-parallel linears, vocab-parallel embedding.

Layers allocate only their shard and leave values uninitialised: the model fills every
parameter from its full (1, 1) value (see ``megaring.model.init``). Each layer declares how
its parameters are split in ``tp_partitions`` (name -> :class:`Partition`); parameters not
listed are replicated over tp.

With ``sequence_parallel`` the activations outside tp regions are ``(B, S / tp, ...)``: a
column-parallel layer all-gathers the sequence on entry and a row-parallel layer
reduce-scatters it on exit. Replicated parameters used on a sequence slice (row-parallel
bias) pass through ``copy_to_tensor_model_parallel_region`` so that backward all-reduces their
gradients over tp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megaring.distributed.mesh import Axis
from megaring.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megaring.tensor_parallel.utils import Partition, divide


def vocab_partition(vocab_size: int, tp_size: int) -> Partition:
    """How a ``(V, dim)`` vocabulary weight is split: ``V`` padded to a multiple of tp, rows split."""
    padded = tp_size * -(-vocab_size // tp_size)
    return Partition(0, (padded,), unpadded=vocab_size)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_axis: Axis) -> torch.Tensor:
    """``-inf`` in the columns of vocab-parallel ``logits`` ``(B, S, V_pad / tp)`` past the real vocabulary.

    A ``-inf`` logit has probability 0 in any softmax/cross entropy and passes no gradient back, so
    the padding never reaches the loss. A no-op when the vocabulary divides by tp.
    """
    local = logits.shape[-1]
    start = tp_axis.rank * local
    if start + local <= vocab_size:
        return logits
    padded = torch.arange(start, start + local, device=logits.device) >= vocab_size  # (V_pad / tp,)
    return logits.masked_fill(padded, float("-inf"))


def enter_tensor_parallel_region(x: torch.Tensor, tp_axis: Axis, sequence_parallel: bool) -> torch.Tensor:
    """The replicated input of a column-parallel matmul: all-gather the sequence slices with sequence
    parallelism (backward reduce-scatters the partial grads), else copy (backward all-reduces)."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, tp_axis)  # (B, S / tp, d) -> (B, S, d)
    return copy_to_tensor_model_parallel_region(x, tp_axis)


def parallel_lm_logits(
    hidden: torch.Tensor, weight: torch.Tensor, tp_axis: Axis, sequence_parallel: bool
) -> torch.Tensor:
    """``Y_i = X E_i^T`` for this rank's vocab slice ``E_i`` of a ``(V / tp, dim)`` weight.

    hidden: ``(B, S, dim)``, or ``(B, S / tp, dim)`` with sequence parallelism.
    Returns the vocab-parallel logits ``(B, S, V / tp)``; the full vocabulary is never gathered.
    Used for the output layer when it shares the embedding weight.
    """
    hidden = enter_tensor_parallel_region(hidden, tp_axis, sequence_parallel and tp_axis.size > 1)
    return F.linear(hidden, weight)  # (B, S, V / tp)


class ColumnParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split by columns over tp.

    ``A = [A_1, ..., A_p]`` and ``b = [b_1, ..., b_p]``; rank ``i`` holds ``A_i``, ``b_i`` and
    computes ``Y_i = X A_i + b_i``. The input is replicated (or all-gathered from the sequence-
    parallel region); backward all-reduces (or reduce-scatters) ``dL/dX = sum_i dL/dY_i A_i^T``.

    ``output_sizes`` fuses several projections (e.g. q, k, v): ``A = [Q | K | V]`` and rank ``i``
    holds ``[Q_i | K_i | V_i]``, so each rank's output splits into whole local heads.
    ``gather_output`` all-gathers ``Y`` (single projection only).
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: int | Sequence[int],
        *,
        tp_axis: Axis,
        bias: bool = False,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        sizes = (output_sizes,) if isinstance(output_sizes, int) else tuple(output_sizes)
        if gather_output and len(sizes) > 1:
            raise ValueError("gather_output needs a single (unfused) output projection")
        self.tp_axis, self.gather_output = tp_axis, gather_output
        self.sequence_parallel = sequence_parallel and tp_axis.size > 1
        self.output_size_per_partition = sum(divide(s, tp_axis.size, "output size") for s in sizes)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size))
        self.bias = nn.Parameter(torch.empty(self.output_size_per_partition)) if bias else None
        self.tp_partitions = {"weight": Partition(0, sizes)}
        if bias:
            self.tp_partitions["bias"] = Partition(0, sizes)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The replicated input ``X`` ``(B, S, in)`` of this layer (all-gathered with sequence parallelism)."""
        return enter_tensor_parallel_region(x, self.tp_axis, self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter(x)  # (B, S, in)
        y = F.linear(x, self.weight, self.bias)  # (B, S, out / tp)
        return gather_from_tensor_model_parallel_region(y, self.tp_axis) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split by rows over tp.

    ``A = [A_1; ...; A_p]`` and ``X = [X_1, ..., X_p]`` (split along its last dim); rank ``i``
    computes the partial ``X_i A_i`` and ``Y = sum_i X_i A_i + b`` is all-reduced (or
    reduce-scattered over the sequence). ``b`` is replicated. With ``input_is_parallel=False``
    the layer first keeps its slice ``X_i`` of a replicated ``X``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tp_axis: Axis,
        bias: bool = False,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence parallelism needs input_is_parallel=True")
        self.tp_axis, self.input_is_parallel = tp_axis, input_is_parallel
        self.sequence_parallel = sequence_parallel and tp_axis.size > 1
        self.input_size_per_partition = divide(input_size, tp_axis.size, "input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition))
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None
        self.tp_partitions = {"weight": Partition(1, (input_size,))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_axis)
        return self.reduce_partial(F.linear(x, self.weight))  # (B, S, out): partial sum over tp

    def reduce_partial(self, y: torch.Tensor) -> torch.Tensor:
        """``sum_i X_i A_i + b`` from this rank's partial ``X_i A_i`` ``(B, S, out)`` (all-reduce or
        reduce-scatter over the sequence); for callers that compute the partial themselves (tiled MLP)."""
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_axis)  # (B, S / tp, out)
        else:
            y = reduce_from_tensor_model_parallel_region(y, self.tp_axis)
        if self.bias is None:
            return y
        bias = copy_to_tensor_model_parallel_region(self.bias, self.tp_axis) if self.sequence_parallel else self.bias
        return y + bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp: ``E = [E_1; ...; E_p]``, ``E_i`` of shape ``(V_pad / p, dim)``.

    ``V`` is padded to ``V_pad``, a multiple of ``p``, with zero rows that no token looks up (full
    state dicts have the real ``V`` rows, see :class:`Partition`). Rank ``i`` looks up the tokens in
    its range ``[i V_pad / p, (i + 1) V_pad / p)`` and writes zeros for the others; the sum over
    ranks (all-reduce, or reduce-scatter over the sequence with sequence parallelism) is the full
    lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_axis: Axis, sequence_parallel: bool = False):
        super().__init__()
        self.tp_axis = tp_axis
        self.sequence_parallel = sequence_parallel and tp_axis.size > 1
        partition = vocab_partition(num_embeddings, tp_axis.size)
        self.num_embeddings_per_partition = partition.local_blocks(tp_axis.size)[0]
        self.vocab_start_index = tp_axis.rank * self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))
        self.tp_partitions = {"weight": partition}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_axis.size == 1:
            return F.embedding(tokens, self.weight)  # (B, S, dim)
        local = tokens - self.vocab_start_index  # (B, S)
        outside = (local < 0) | (local >= self.num_embeddings_per_partition)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, S, dim)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_axis)  # (B, S / tp, dim)
        return reduce_from_tensor_model_parallel_region(out, self.tp_axis)
