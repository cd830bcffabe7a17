"""Cross entropy over vocab-parallel logits: the full-vocabulary logits never meet on one rank.

With logits ``z`` split over tp as ``z = [z_1, ..., z_p]`` (rank ``i`` holds vocab range
``[i V/p, (i+1) V/p)``) and target ``t``::

    m    = max_i max(z_i)                      (all-reduce MAX; a constant shift)
    s    = sum_i sum_v exp(z_i,v - m)          (all-reduce SUM)
    z_t  = the target logit, taken by the one rank whose range holds t (all-reduce SUM)
    loss = log(s) + m - z_t
    dloss/dz_i = softmax(z)_i - onehot(t)_i    (local: no communication in backward)

Tokens labelled ``IGNORE_INDEX`` get loss 0 and zero gradient. Computed in float32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis

IGNORE_INDEX = -100


def _all_reduce_(x: torch.Tensor, axis: Axis, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if axis.size > 1:
        dist.all_reduce(x, op=op, group=axis.group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, axis):
        vocab_local = logits.shape[-1]
        z = logits.float()  # (B, S, V / tp)
        z_max = _all_reduce_(z.amax(dim=-1), axis, dist.ReduceOp.MAX)  # (B, S)
        z = z - z_max.unsqueeze(-1)  # a fresh tensor: safe to overwrite below

        valid = labels != IGNORE_INDEX  # (B, S)
        target = labels - axis.rank * vocab_local
        in_shard = valid & (target >= 0) & (target < vocab_local)
        target = target.masked_fill(~in_shard, 0)
        z_target = z.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)  # (B, S)

        exp = z.exp_()  # (B, S, V / tp)
        sums = _all_reduce_(torch.stack([exp.sum(dim=-1), z_target]), axis)  # (2, B, S)
        sum_exp, z_target = sums[0], sums[1]
        loss = (sum_exp.log() - z_target).masked_fill(~valid, 0.0)  # (B, S)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, target, in_shard, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        softmax, target, in_shard, valid = ctx.saved_tensors
        grad = softmax  # overwritten in place: this graph is used once
        grad.scatter_add_(-1, target.unsqueeze(-1), -in_shard.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_axis: Axis) -> torch.Tensor:
    """Per-token cross entropy of vocab-parallel ``logits``.

    logits: ``(B, S, V / tp)`` this rank's vocab shard; labels: ``(B, S)`` global token ids or
    ``IGNORE_INDEX``. Returns float32 ``(B, S)`` losses, identical on every tp rank, 0 where ignored.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    return _VocabParallelCrossEntropy.apply(logits, labels, tp_axis)
