"""What a model learns about parallelism, once, at construction: the tp and cp axes and options."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megaring.distributed.mesh import Axis, ParallelMesh
from megaring.ring.layout import check_layout


@dataclass(frozen=True)
class ParallelContext:
    """The tp axis (weights split), the cp axis (sequence split, ring attention) and options.

    ``sequence_parallel``: Megatron sequence parallelism inside the tp group (norms and residuals
    on ``S / tp`` tokens). ``layout``: how the cp ranks hold the sequence (``megaring.ring.layout``).
    ``attn_kernel``: ``None`` (automatic) or a name from ``megaring.kernels``.
    ``ring_backward``: ``"whole"`` or ``"chunked"``, the backward schedule of ring attention.
    """

    tp: Axis
    cp: Axis
    sequence_parallel: bool = False
    layout: str = "zigzag"
    attn_kernel: str | None = None
    ring_backward: str = "whole"

    def __post_init__(self):
        check_layout(self.layout)

    @classmethod
    def single(cls, **options) -> ParallelContext:
        """One process: no tp, no cp."""
        return cls(Axis.single("tp"), Axis.single("cp"), **options)

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh, **options) -> ParallelContext:
        return cls(mesh.tp, mesh.cp, **options)

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The group ring attention runs over; ``None`` means plain single-process attention."""
        return self.cp.group if self.cp.size > 1 else None

    @property
    def sequence_parallel_active(self) -> bool:
        return self.sequence_parallel and self.tp.size > 1
