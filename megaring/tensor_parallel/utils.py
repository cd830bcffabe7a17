"""Shard bookkeeping for tensor parallelism: how a full weight is cut over the tp axis.

Pure indexing, no communication: the same :class:`Partition` slices a full weight for
initialisation and checkpoint loading, and reassembles gathered shards for export.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator / denominator``, raising when it does not divide evenly."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by {denominator}")
    return numerator // denominator


@dataclass(frozen=True)
class Partition:
    """A tensor split over the tp axis along ``dim``.

    Along ``dim`` the full tensor is a concatenation of ``blocks`` (their full sizes, e.g. the
    q, k and v outputs of a fused projection). Each block is cut into ``tp`` equal parts and
    tp rank ``r`` holds part ``r`` of every block, concatenated in block order::

        full  = [B_1 | B_2 | ...],   B_j = [B_j,0 | B_j,1 | ... | B_j,tp-1]
        local = [B_1,r | B_2,r | ...]

    With one block this is Megatron's plain split ``A = [A_1 ... A_p]``.
    """

    dim: int
    blocks: tuple[int, ...]

    def local_blocks(self, tp_size: int) -> list[int]:
        return [divide(b, tp_size, "partitioned block") for b in self.blocks]

    def full_shape(self, local_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = shape[self.dim] * tp_size
        return tuple(shape)

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """Rank ``tp_rank``'s part of ``full`` (a contiguous copy)."""
        if full.shape[self.dim] != sum(self.blocks):
            raise ValueError(f"expected size {sum(self.blocks)} along dim {self.dim}, got {tuple(full.shape)}")
        parts = [b.chunk(tp_size, dim=self.dim)[tp_rank] for b in full.split(list(self.blocks), dim=self.dim)]
        return torch.cat(parts, dim=self.dim).contiguous()

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`shard`: ``shards[r]`` is tp rank r's part."""
        local = self.local_blocks(len(shards))
        per_rank = [s.split(local, dim=self.dim) for s in shards]
        blocks = [torch.cat([pieces[j] for pieces in per_rank], dim=self.dim) for j in range(len(local))]
        return torch.cat(blocks, dim=self.dim)
