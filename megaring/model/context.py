"""What a model learns about parallelism, once, at construction: the tp and cp axes and options."""

from __future__ import annotations

from dataclasses import dataclass, field

from megaring.distributed.mesh import Axis, ParallelMesh, Traffic
from megaring.layout import check_layout
from megaring.ring.route import RouteCache
from megaring.ring.settings import RingSettings


@dataclass(frozen=True)
class ParallelContext:
    """The tp axis (weights split), the cp axis (sequence split) with its factors, and options.

    ``cp_ulysses`` / ``cp_ring``: cp = Ulysses group (head all-to-all) x ring
    (:func:`megaring.context_attention`); by default cp is all ring.

    ``sequence_parallel``: Megatron sequence parallelism inside the tp group (norms and residuals
    on ``S / tp`` tokens). ``layout``: how the cp ranks hold the sequence (``megaring.layout``).
    ``attn_kernel``: ``None`` (automatic) or a name from ``megaring.kernels``.
    ``ring_backward``: ``"whole"`` or ``"chunked"``, the backward of ring attention.
    ``ring_settings``: ring attention's tile and chunk sizes.
    ``traffic``: counts the K/V bytes this rank sends in ring attention (the trainer reads and
    resets it every step); None: not counted. ``routes``: the mask-aware ring's route of the
    current forward, built by its first layer and reused by the others (:class:`RouteCache`).
    """

    tp: Axis
    cp: Axis
    sequence_parallel: bool = False
    layout: str = "zigzag"
    attn_kernel: str | None = None
    ring_backward: str = "whole"
    ring_settings: RingSettings = RingSettings()
    traffic: Traffic | None = None
    cp_ulysses: Axis | None = None
    cp_ring: Axis | None = None
    routes: RouteCache = field(default_factory=RouteCache, compare=False, repr=False)

    def __post_init__(self):
        check_layout(self.layout)
        if self.cp_ulysses is None:
            object.__setattr__(self, "cp_ulysses", Axis.single("cp_ulysses"))
        if self.cp_ring is None:
            object.__setattr__(self, "cp_ring", self.cp)
        if self.cp_ulysses.size * self.cp_ring.size != self.cp.size:
            raise ValueError(f"cp_ulysses ({self.cp_ulysses.size}) x cp_ring ({self.cp_ring.size}) "
                             f"must be cp ({self.cp.size})")

    @classmethod
    def single(cls, **options) -> ParallelContext:
        """One process: no tp, no cp."""
        return cls(Axis.single("tp"), Axis.single("cp"), **options)

    def rebind_cp(self, cp: Axis) -> None:
        """Run attention on ``cp`` from the next forward on: the one change after construction, at a
        stage boundary of ``data.stages`` under ``parallel.dynamic_cp`` (the cp' of each stage's
        sequence length). Every module holds this object, so all of them see the new axis; ``cp``
        is all ring (dynamic cp requires ``parallel.ulysses=1``)."""
        object.__setattr__(self, "cp", cp)
        object.__setattr__(self, "cp_ring", cp)
        object.__setattr__(self, "cp_ulysses", Axis.single("cp_ulysses"))

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh, *, cp: Axis | None = None, **options) -> ParallelContext:
        """The context of ``mesh``; ``cp``: a ring-only sub-axis of its cp to run attention on
        (``parallel.dynamic_cp``, :func:`megaring.distributed.mesh.build_cp_subaxis`)."""
        if cp is not None and cp is not mesh.cp:
            return cls(mesh.tp, cp, cp_ring=cp, **options)
        return cls(mesh.tp, mesh.cp, cp_ulysses=mesh.cp_ulysses, cp_ring=mesh.cp_ring, **options)

    @property
    def sequence_parallel_active(self) -> bool:
        return self.sequence_parallel and self.tp.size > 1
