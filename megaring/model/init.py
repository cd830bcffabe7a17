"""Layout-independent initialisation: every rank fills its shards from the full (1, 1) weights.

Each parameter's full value is drawn from its own generator, seeded by ``(seed, name)``, and
this rank keeps its tp slice. The model built at any (cp, tp) therefore holds exactly the
shards of the (1, 1) model, with no communication. Peak extra memory is one full parameter.

Rules (Llama / GPT-2 style): norm weights 1, biases 0, output projections of the residual
branches (``wo``, ``w2``) ``N(0, init_std / sqrt(2 * n_layers))``, everything else ``N(0, init_std)``.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from megaring.model.config import ModelConfig
from megaring.model.context import ParallelContext
from megaring.tensor_parallel.utils import Partition

RESIDUAL_OUTPUTS = ("wo.weight", "w2.weight")


def tp_partitions(model: nn.Module) -> dict[str, Partition]:
    """Full parameter name -> how it is split over tp; parameters not listed are replicated."""
    out = {}
    for prefix, module in model.named_modules():
        for name, partition in getattr(module, "tp_partitions", {}).items():
            out[f"{prefix}.{name}" if prefix else name] = partition
    return out


def full_shape(param: torch.Tensor, partition: Partition | None, tp_size: int) -> tuple[int, ...]:
    return tuple(param.shape) if partition is None else partition.full_shape(param.shape, tp_size)


class ShardWriter:
    """How a loader fills this rank's tp shard of a parameter, one parameter at a time.

    The loader asks for :meth:`shard_shape` (this tp rank's whole shard) and :meth:`owned_range`
    (the flat elements ``[start, stop)`` of the shard this rank stores), builds only those elements
    and hands them to :meth:`write`. Here a rank stores its whole shard; under ZeRO-3 the engine's
    ``ZeroPartitionWriter`` stores only this rank's partition of it, so a loader never holds more
    than the partition of one shard.
    """

    def shard_shape(self, param: torch.Tensor) -> torch.Size:
        return param.shape

    def owned_range(self, param: torch.Tensor) -> tuple[int, int]:
        return 0, param.numel()

    def write(self, param: torch.Tensor, flat: torch.Tensor) -> None:
        """``param``'s elements ``owned_range`` <- ``flat`` (cast to the parameter's dtype)."""
        with torch.no_grad():
            param.copy_(flat.view(param.shape))


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed of ``(seed, name)``, stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def full_init_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The (1, 1) model's initial value of parameter ``name``."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(RESIDUAL_OUTPUTS):
        std = std / math.sqrt(2 * cfg.n_layers)
    generator = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, ctx: ParallelContext, *, seed: int,
                 writer: ShardWriter | None = None) -> None:
    """Fill this rank's shards with the seed's (1, 1) values, one parameter at a time, through
    ``writer`` (default: the whole shard into the parameter; ZeRO-3: this rank's partition of it)."""
    writer = writer or ShardWriter()
    partitions = tp_partitions(model)
    for name, param in model.named_parameters():
        part, shape = partitions.get(name), tuple(writer.shard_shape(param))
        full = full_init_value(name, shape if part is None else part.full_shape(shape, ctx.tp.size), cfg, seed)
        local = full if part is None else part.shard(full, ctx.tp.rank, ctx.tp.size)
        start, stop = writer.owned_range(param)
        writer.write(param, local.reshape(-1)[start:stop])
