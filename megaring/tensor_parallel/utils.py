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

    ``unpadded`` (one block only): the full tensor's real size along ``dim`` when the block is
    padded to a multiple of tp (the vocabulary). Full tensors have the real size; shards hold the
    padded block's parts, the rows beyond the real size being zeros.
    """

    dim: int
    blocks: tuple[int, ...]
    unpadded: int | None = None

    def __post_init__(self):
        if self.unpadded is not None and (len(self.blocks) != 1 or self.unpadded > self.blocks[0]):
            raise ValueError(f"padding needs one block of at least {self.unpadded} rows, got {self.blocks}")

    @property
    def full_size(self) -> int:
        """The full tensor's size along ``dim`` (without padding)."""
        return sum(self.blocks) if self.unpadded is None else self.unpadded

    def local_blocks(self, tp_size: int) -> list[int]:
        return [divide(b, tp_size, "partitioned block") for b in self.blocks]

    def local_ranges(self, tp_rank: int, tp_size: int) -> list[tuple[int, int]]:
        """Per block, the ``[start, stop)`` of rank ``tp_rank``'s part inside the block (padded sizes)."""
        return [(tp_rank * n, (tp_rank + 1) * n) for n in self.local_blocks(tp_size)]

    def full_shape(self, local_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = shape[self.dim] * tp_size if self.unpadded is None else self.unpadded
        return tuple(shape)

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """Rank ``tp_rank``'s part of ``full`` (a contiguous copy; padded rows are zeros)."""
        if full.shape[self.dim] != self.full_size:
            raise ValueError(f"expected size {self.full_size} along dim {self.dim}, got {tuple(full.shape)}")
        if self.unpadded is not None and self.unpadded < self.blocks[0]:
            pad = list(full.shape)
            pad[self.dim] = self.blocks[0] - self.unpadded
            full = torch.cat([full, full.new_zeros(pad)], dim=self.dim)
        parts = [b.chunk(tp_size, dim=self.dim)[tp_rank] for b in full.split(list(self.blocks), dim=self.dim)]
        return torch.cat(parts, dim=self.dim).contiguous()

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`shard`: ``shards[r]`` is tp rank r's part (padding dropped)."""
        local = self.local_blocks(len(shards))
        per_rank = [s.split(local, dim=self.dim) for s in shards]
        blocks = [torch.cat([pieces[j] for pieces in per_rank], dim=self.dim) for j in range(len(local))]
        return torch.cat(blocks, dim=self.dim).narrow(self.dim, 0, self.full_size)
