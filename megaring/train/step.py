"""One optimizer step: the exact gradient of the mean token loss over the global batch, at any mesh.

With ``N`` the valid tokens of the whole step (all dp ranks, cp shards and micro-batches) and
``s_i`` a micro-batch's local token-loss sum, the target is ``L = sum_i s_i / N`` over all ranks.
DeepSpeed sums the gradients over ``dp_cp`` and divides by ``grad_divisor``, so each micro-batch
backpropagates ``s_i * grad_divisor / N`` (and no further division by the accumulation steps).
tp ranks compute the same token losses; the model's tp communication already shaped their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis, ParallelMesh
from megaring.model import count_valid_tokens, vocab_parallel_cross_entropy
from megaring.train.engine import TrainEngine


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean token loss over the global batch
    grad_norm: float | None  # global norm before clipping
    lr: float  # the learning rate this update used
    valid_tokens: int  # over the global batch


def train_step(engine: TrainEngine, micro_batches: list[dict[str, torch.Tensor]], mesh: ParallelMesh,
               device: torch.device, lr: float) -> StepResult:
    engine.set_lr(lr)
    batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
    labels = torch.stack([mb["labels"] for mb in batches])  # (micro_batches, B, S_local)
    count = count_valid_tokens(labels.to(device), mesh.dp_cp).to(torch.float64)  # all-reduced over dp_cp
    scale = engine.grad_divisor / count.clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    own_norm = None
    for i, mb in enumerate(batches):
        logits = engine.ds(mb["tokens"], mb["positions"], mb["segment_ids"])  # (B, S_local, V / tp)
        token_losses = vocab_parallel_cross_entropy(logits, mb["labels"], mesh.tp)  # (B, S_local)
        local_sum = token_losses.float().sum()
        engine.ds.backward(local_sum * scale.to(local_sum.dtype), scale_wrt_gas=False)
        if i == len(batches) - 1 and not engine.reports_grad_norm:
            own_norm = grad_norm(engine.module, mesh.tp)  # gradients are reduced by now
        engine.ds.step()  # updates on the last micro-batch only (the accumulation boundary)
        loss_sum += local_sum.detach().to(torch.float64)
    if mesh.dp_cp.size > 1:
        dist.all_reduce(loss_sum, group=mesh.dp_cp.group)
    norm = engine.ds.get_global_grad_norm() if engine.reports_grad_norm else own_norm
    return StepResult((loss_sum / count.clamp(min=1.0)).item(), _as_float(norm), lr, int(count.item()))


def grad_norm(model: torch.nn.Module, tp: Axis) -> float:
    """Global 2-norm of reduced gradients: replicated parameters once, tp shards from every tp rank."""
    device = next(model.parameters()).device
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is not None and (tp.rank == 0 or getattr(p, "tensor_model_parallel", False)):
            squares += p.grad.detach().to(torch.float64).pow(2).sum()
    if tp.size > 1:
        dist.all_reduce(squares, group=tp.group)
    return squares.sqrt().item()


def _as_float(norm) -> float | None:
    return None if norm is None else float(norm.item() if torch.is_tensor(norm) else norm)
