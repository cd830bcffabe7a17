"""Full (1, 1) state dicts from and into any (cp, tp) layout.

cp ranks hold identical weights, so only tp communicates: gathering all-gathers each split
parameter over tp (every rank receives the full dict); loading slices locally. Keys are the
(1, 1) model's parameter names; with tied embeddings only ``tok_embeddings.weight`` appears.
"""

from __future__ import annotations

import torch
from torch import nn

from megaring.distributed.mesh import Axis
from megaring.errors import problem_list
from megaring.model.context import ParallelContext
from megaring.model.init import full_shape, tp_partitions
from megaring.tensor_parallel.mappings import all_gather_list, gather_list_to_first
from megaring.tensor_parallel.utils import Partition


def gather_full_tensor(local: torch.Tensor, part: Partition | None, tp: Axis, *,
                       first_only: bool = False) -> torch.Tensor | None:
    """The full (1, 1) value of one tensor from its tp shards (collective over tp when split);
    with ``first_only`` only tp rank 0 receives it (None elsewhere), holding no full copy on the others."""
    if part is None or tp.size == 1:
        return local.detach().clone() if tp.rank == 0 or not first_only else None
    if first_only:
        parts = gather_list_to_first(local.detach(), tp)
        return None if parts is None else part.unshard(parts)
    return part.unshard(all_gather_list(local.detach(), tp))


def shard_full_tensor(full: torch.Tensor, part: Partition | None, tp: Axis) -> torch.Tensor:
    """This tp rank's shard of a full (1, 1) tensor (no communication)."""
    return full if part is None else part.shard(full, tp.rank, tp.size)


def _gather(tensors: dict[str, torch.Tensor], model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    partitions = tp_partitions(model)
    return {name: gather_full_tensor(local, partitions.get(name), ctx.tp) for name, local in tensors.items()}


def gather_full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """The full weights on every rank (collective over tp: call it on all tp ranks)."""
    return _gather(dict(model.named_parameters()), model, ctx)


def gather_full_grads(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Each parameter's ``.grad`` at full shape (collective over tp). Not reduced over cp or dp."""
    grads = {}
    for name, param in model.named_parameters():
        grads[name] = param.grad if param.grad is not None else torch.zeros_like(param)
    return _gather(grads, model, ctx)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], ctx: ParallelContext) -> None:
    """Copy this rank's shards of the full ``state`` into ``model`` (no communication)."""
    partitions = tp_partitions(model)
    params = dict(model.named_parameters())
    problems = [f"missing key {k!r}" for k in params if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in params]
    for name, param in params.items():
        expected = full_shape(param, partitions.get(name), ctx.tp.size)
        if name in state and tuple(state[name].shape) != expected:
            problems.append(f"{name}: shape {tuple(state[name].shape)}, expected {expected}")
    if problems:
        raise ValueError(problem_list("cannot load the state dict", problems))
    for name, param in params.items():
        param.copy_(shard_full_tensor(state[name].to(dtype=param.dtype, device=param.device), partitions.get(name),
                                      ctx.tp))
