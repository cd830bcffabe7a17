"""One optimizer step: the exact gradient of the mean token loss over the global batch, at any mesh.

With ``N`` the valid tokens of the whole step (all dp ranks, cp shards and micro-batches) and
``s_i`` a micro-batch's local token-loss sum, the target is ``L = sum_i s_i / N`` over all ranks:
each micro-batch backpropagates its share ``local_loss(token losses, N) = s_i / N``
(:func:`megaring.model.local_loss`), and the engine sums the shares' gradients over ``dp_cp``.
tp ranks compute the same token losses; the model's tp communication already shaped their gradients.
Labels of untrained tokens (prompts of chat data) are ``IGNORE_INDEX``, so ``N`` counts trained
tokens only; a step whose global batch holds none (``N = 0``, the same on every rank) runs no
forward, backward or update and comes back with ``empty=True`` (``skipped_empty`` in the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaring.distributed.flight import FLIGHT
from megaring.distributed.mesh import Axis, ParallelMesh
from megaring.engine.deepspeed_engine import TrainEngine
from megaring.model import count_valid_tokens, local_loss
from megaring.tensor_parallel.cross_entropy import IGNORE_INDEX


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean token loss over the global batch
    grad_norm: float | None  # global norm before clipping
    lr: float  # the learning rate this update used
    valid_tokens: int  # over the global batch
    applied: bool = True  # False: the update was skipped on every rank (non-finite gradients)
    empty: bool = False  # True: no trained token in the global batch; nothing was computed
    # data=mixture: per source, (mean token loss, trained tokens) over the global batch
    source_losses: tuple[tuple[float, int], ...] | None = None


def others(axis: Axis) -> tuple[int, ...]:
    """The other global ranks of ``axis`` (whom a collective over it waits on)."""
    return tuple(r for r in axis.ranks if r != axis.ranks[axis.rank])


class SourceLosses:
    """Token-loss sums and trained-token counts per source of a mixture (micro-batches carry a
    ``source`` id per sample), all-reduced over ``dp_cp`` once per step."""

    def __init__(self, num_sources: int, device: torch.device):
        self.sums = torch.zeros(2, num_sources, dtype=torch.float64, device=device)  # (loss sum, tokens) x sources

    def add(self, token_losses: torch.Tensor, labels: torch.Tensor, source: torch.Tensor) -> None:
        """token_losses, labels: (B, S_local); source: (B,) ids."""
        self.sums[0].index_add_(0, source, token_losses.detach().sum(dim=1).to(torch.float64))
        self.sums[1].index_add_(0, source, (labels != IGNORE_INDEX).sum(dim=1).to(torch.float64))

    def reduce(self, mesh: ParallelMesh) -> tuple[tuple[float, int], ...]:
        if mesh.dp_cp.size > 1:
            dist.all_reduce(self.sums, group=mesh.dp_cp.group)
        return tuple((float(s / max(n, 1.0)), int(n)) for s, n in self.sums.T.tolist())


def train_step(engine: TrainEngine, micro_batches: list[dict[str, torch.Tensor]], mesh: ParallelMesh,
               device: torch.device, lr: float, num_sources: int = 0) -> StepResult:
    """``num_sources``: a mixture's source count (its micro-batches carry ``source`` ids): per-source losses."""
    engine.set_lr(lr)
    batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
    labels = torch.stack([mb["labels"] for mb in batches])  # (micro_batches, B, S_local)
    peers = others(mesh.dp_cp)
    with FLIGHT.waiting("all-reduce of the valid-token count over dp_cp", peers):
        count = count_valid_tokens(labels, mesh.dp_cp).to(torch.float64)  # all-reduced over dp_cp
    if count.item() == 0:  # the same on every rank: all skip together
        return StepResult(0.0, None, lr, 0, applied=False, empty=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    per_source = SourceLosses(num_sources, device) if num_sources else None
    outcome = None
    for i, mb in enumerate(batches):
        FLIGHT.at(micro_batch=i, phase="forward")
        token_losses = engine.forward(mb["tokens"], mb["positions"], mb["segment_ids"], mb["labels"])  # (B, S_local)
        FLIGHT.at(phase="backward (ZeRO gradient reduction inside)")
        engine.backward(local_loss(token_losses, count))
        FLIGHT.at(phase="optimizer step")
        with FLIGHT.waiting("the engine's step (ZeRO: gradient norm, overflow check, parameter gather over dp_cp)",
                            peers):
            outcome = engine.step()  # the update and its norm come on the last micro-batch
        loss_sum += token_losses.detach().sum().to(torch.float64)
        if per_source is not None:
            per_source.add(token_losses, mb["labels"], mb["source"])
    if mesh.dp_cp.size > 1:
        with FLIGHT.waiting("all-reduce of the loss over dp_cp", peers):
            dist.all_reduce(loss_sum, group=mesh.dp_cp.group)
    with FLIGHT.waiting("all-reduce of the per-source losses over dp_cp", peers):
        sources = per_source.reduce(mesh) if per_source is not None else None
    return StepResult((loss_sum / count.clamp(min=1.0)).item(), outcome.grad_norm, lr, int(count.item()),
                      outcome.applied, source_losses=sources)
