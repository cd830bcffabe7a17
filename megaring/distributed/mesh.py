"""The 3D process mesh: ``("dp", "cp", "tp")`` with tp innermost, plus the flattened ``dp_cp``.

Rank layout (row-major over ``(dp, cp, tp)``)::

    rank = (dp_rank * cp + cp_rank) * tp + tp_rank

cp ranks hold the same weights, so gradients and ZeRO shards span ``dp_cp``.
Communication code never reads a global: it receives an :class:`Axis`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from megaring.errors import problem_list

AXES = ("dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh axes. ``validate`` reports every problem in one error."""

    dp: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    def problems(self, world_size: int | None = None) -> list[str]:
        """Human-readable problems with these sizes (empty when valid)."""
        out = [f"parallel.{n}={getattr(self, n)} must be an integer >= 1"
               for n in AXES if not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        if not out and world_size is not None and self.world_size != world_size:
            out.append(
                f"dp*cp*tp = {self.dp}*{self.cp}*{self.tp} = {self.world_size} "
                f"does not match the world size {world_size}: change parallel.dp/cp/tp "
                f"or the number of processes"
            )
        return out

    def validate(self, world_size: int | None = None) -> None:
        problems = self.problems(world_size)
        if problems:
            raise ValueError(problem_list("invalid parallel layout", problems))

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank."""
        return {"dp": rank // (self.cp * self.tp), "cp": (rank // self.tp) % self.cp, "tp": rank % self.tp}

    def rank_of(self, dp: int, cp: int, tp: int) -> int:
        return (dp * self.cp + cp) * self.tp + tp


@dataclass(frozen=True)
class Axis:
    """One mesh axis as seen by this rank: its group, this rank's index in it, its size."""

    name: str
    group: dist.ProcessGroup | None
    rank: int
    size: int
    ranks: tuple[int, ...]  # global ranks of the group, in group-rank order

    @classmethod
    def single(cls, name: str, global_rank: int = 0) -> Axis:
        return cls(name, None, 0, 1, (global_rank,))

    @classmethod
    def of_group(cls, group: dist.ProcessGroup, name: str) -> Axis:
        """The axis of an existing process group, as this rank sees it."""
        ranks = tuple(dist.get_process_group_ranks(group))
        return cls(name, group, dist.get_rank(group), len(ranks), ranks)


@dataclass(frozen=True)
class ParallelMesh:
    """Axes ``dp``, ``cp``, ``tp`` and ``dp_cp`` of the running job."""

    dims: ParallelDims
    rank: int
    dp: Axis
    cp: Axis
    tp: Axis
    dp_cp: Axis
    device_mesh: object | None = None  # torch DeviceMesh when distributed

    @classmethod
    def single(cls) -> ParallelMesh:
        """The trivial mesh of a single process (no process groups)."""
        return cls(ParallelDims(), 0, *(Axis.single(n) for n in ("dp", "cp", "tp", "dp_cp")))

    def axis(self, name: str) -> Axis:
        return getattr(self, name)

    def describe(self) -> str:
        return f"dp={self.dims.dp} cp={self.dims.cp} tp={self.dims.tp} (world {self.dims.world_size})"


def group_ranks(dims: ParallelDims, rank: int, axes: tuple[str, ...]) -> tuple[int, ...]:
    """Global ranks sharing every coordinate of ``rank`` except those in ``axes``, in group order."""
    me = dims.coords(rank)
    members = []
    for r in range(dims.world_size):
        c = dims.coords(r)
        if all(c[a] == me[a] for a in AXES if a not in axes):
            members.append(r)
    return tuple(members)


def build_mesh(dims: ParallelDims, device_type: str = "cpu", timeout_s: float | None = 600.0) -> ParallelMesh:
    """Build the mesh over the initialised default group. Validates before any collective.

    ``timeout_s`` bounds every collective on the axis groups (torch would otherwise give
    sub-groups its 10/30-minute default, so a dead rank would stall the job for that long).
    """
    if not dist.is_initialized():
        dims.validate(1)
        return ParallelMesh.single()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    dims.validate(world_size)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dims.dp, dims.cp, dims.tp), mesh_dim_names=AXES)
    flat = mesh["dp", "cp"]._flatten("dp_cp")
    axes = {}
    for name, sub, members in (
        ("dp", mesh["dp"], ("dp",)),
        ("cp", mesh["cp"], ("cp",)),
        ("tp", mesh["tp"], ("tp",)),
        ("dp_cp", flat, ("dp", "cp")),
    ):
        ranks = group_ranks(dims, rank, members)
        group = sub.get_group()
        if timeout_s is not None:
            _set_timeout(group, timeout_s)
        axes[name] = Axis(name, group, ranks.index(rank), len(ranks), ranks)
    return ParallelMesh(dims, rank, axes["dp"], axes["cp"], axes["tp"], axes["dp_cp"], mesh)


def _set_timeout(group: dist.ProcessGroup, timeout_s: float) -> None:
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.3
    if setter is not None:
        setter(datetime.timedelta(seconds=timeout_s), group)
