"""The output projection and the vocab-parallel cross entropy fused and computed in token chunks.

For hidden states ``X`` ``(N, dim)`` (replicated over tp), this rank's vocab shard ``W_i``
``(V_pad / tp, dim)`` and targets ``t``, chunk ``c`` of ``n`` tokens computes::

    z_c    = X_c W_i^T                           (n, V_pad / tp), padded columns -inf
    lse_c  = log sum_v exp(z_c)                  (all-reduce MAX then SUM over tp, as in cross_entropy.py)
    loss_c = lse_c - z_c[t]                      (n,), 0 where t = IGNORE_INDEX

and keeps only ``lse`` (N floats). The backward recomputes each chunk's logits and needs no
communication::

    dz_c = (exp(z_c - lse_c) - onehot(t)) * dloss_c
    dX_c = dz_c W_i                              (partial over tp: the caller's region all-reduces)
    dW_i = sum_c dz_c^T X_c

so at most one chunk of logits (and its gradient) exists at a time: ``n x V / tp`` floats instead
of ``N x V / tp``. Liger's fused linear cross entropy and torchtitan's chunked loss do the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis
from megaring.tensor_parallel.cross_entropy import IGNORE_INDEX, _all_reduce_
from megaring.tensor_parallel.layers import enter_tensor_parallel_region, mask_padded_vocab


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, vocab_size: int, axis: Axis) -> torch.Tensor:
    return mask_padded_vocab(x @ weight.t(), vocab_size, axis).float()  # (n, V_pad / tp)


def _local_targets(labels: torch.Tensor, vocab_local: int, axis: Axis) -> tuple[torch.Tensor, torch.Tensor]:
    """(target index in this shard (0 outside), whether this shard holds the target)."""
    target = labels - axis.rank * vocab_local
    in_shard = (labels != IGNORE_INDEX) & (target >= 0) & (target < vocab_local)
    return target.masked_fill(~in_shard, 0), in_shard


def _chunk_forward(x, weight, labels, vocab_size, axis) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) of one chunk: ``(n,)`` each, float32."""
    z = _chunk_logits(x, weight, vocab_size, axis)  # (n, V_pad / tp)
    target, in_shard = _local_targets(labels, z.shape[-1], axis)
    z_max = _all_reduce_(z.amax(dim=-1), axis, dist.ReduceOp.MAX)  # (n,)
    z_target = z.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)  # (n,)
    sum_exp = (z - z_max.unsqueeze(-1)).exp_().sum(dim=-1)
    sums = _all_reduce_(torch.stack([sum_exp, z_target]), axis)  # (2, n)
    lse = sums[0].log() + z_max
    loss = (lse - sums[1]).masked_fill(labels == IGNORE_INDEX, 0.0)
    return loss, lse


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, vocab_size, axis, chunk):
        # x: (N, dim) replicated over tp; weight: (V_pad / tp, dim); labels: (N,)
        losses, lses = [], []
        for start in range(0, x.shape[0], chunk):
            sl = slice(start, start + chunk)
            loss, lse = _chunk_forward(x[sl], weight, labels[sl], vocab_size, axis)
            losses.append(loss)
            lses.append(lse)
        ctx.save_for_backward(x, weight, labels, torch.cat(lses))
        ctx.vocab_size, ctx.axis, ctx.chunk = vocab_size, axis, chunk
        return torch.cat(losses)  # (N,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, weight, labels, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, x.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            grad_z = _chunk_logits(x[sl], weight, ctx.vocab_size, ctx.axis)  # recomputed (n, V_pad / tp)
            grad_z.sub_(lse[sl].unsqueeze(-1)).exp_()  # softmax; padded columns exp(-inf) = 0
            target, in_shard = _local_targets(labels[sl], grad_z.shape[-1], ctx.axis)
            grad_z.scatter_add_(-1, target.unsqueeze(-1), -in_shard.to(grad_z.dtype).unsqueeze(-1))
            scale = grad_loss[sl] * (labels[sl] != IGNORE_INDEX)
            grad_z = grad_z.mul_(scale.unsqueeze(-1)).to(x.dtype)
            grad_x[sl] = grad_z @ weight  # (n, dim): this rank's partial sum over the vocabulary
            grad_w.addmm_(grad_z.t().float(), x[sl].float())
        return grad_x, grad_w.to(weight.dtype), None, None, None, None


def chunked_lm_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    tp_axis: Axis,
    sequence_parallel: bool,
    chunk: int,
) -> torch.Tensor:
    """Per-token cross entropy of the logits ``hidden W^T``, never holding more than ``chunk`` tokens of them.

    hidden: ``(B, S, dim)``, or ``(B, S / tp, dim)`` with sequence parallelism (all-gathered here,
    as a column-parallel layer would); weight: this rank's ``(V_pad / tp, dim)`` output shard;
    labels ``(B, S)``. Returns float32 ``(B, S)`` losses equal to
    ``vocab_parallel_cross_entropy(mask_padded_vocab(hidden W^T), labels)``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    x = enter_tensor_parallel_region(hidden, tp_axis, sequence_parallel and tp_axis.size > 1)  # (B, S, dim)
    if x.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(x.shape)} and labels {tuple(labels.shape)} disagree")
    flat = x.reshape(-1, x.shape[-1])  # (B * S, dim)
    losses = _ChunkedLinearCrossEntropy.apply(flat, weight, labels.reshape(-1), vocab_size, tp_axis, chunk)
    return losses.view(labels.shape)
