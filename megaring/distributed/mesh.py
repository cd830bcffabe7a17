"""The process mesh: ``("dp", "cp", "tp")`` with tp innermost, plus the flattened ``dp_cp``.

The cp axis factors into ``cp = cp_ring * cp_ulysses`` (``parallel.ulysses``): Ulysses (head-parallel
all-to-all) innermost inside cp, next to tp on the fastest links, the ring across. Rank layout
(row-major over ``(dp, cp_ring, cp_ulysses, tp)``)::

    cp_rank = ring_rank * ulysses + ulysses_rank
    rank    = (dp_rank * cp + cp_rank) * tp + tp_rank

so ``cp_rank`` and everything derived from it (the data reader's shard, ``dp_cp``, ZeRO
partitions, checkpoints) are the same for every factorisation of cp. cp ranks hold the same
weights, so gradients and ZeRO shards span ``dp_cp``.
Communication code never reads a global: it receives an :class:`Axis`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch.distributed as dist

from megaring.errors import problem_list

AXES = ("dp", "cp", "tp")
CP_AXES = ("cp_ring", "cp_ulysses")  # the factors of cp, outer to inner


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh axes. ``validate`` reports every problem in one error.

    ``ulysses``: the size of the Ulysses (head all-to-all) group inside cp; the ring runs over
    ``ring = cp / ulysses`` groups. 1 is pure ring attention, ``cp`` pure Ulysses.
    """

    dp: int = 1
    cp: int = 1
    tp: int = 1
    ulysses: int = 1

    @property
    def ring(self) -> int:
        """The ring size: ``cp / ulysses``."""
        return self.cp // self.ulysses

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    def problems(self, world_size: int | None = None) -> list[str]:
        """Human-readable problems with these sizes (empty when valid)."""
        out = [f"parallel.{n}={getattr(self, n)} must be an integer >= 1"
               for n in (*AXES, "ulysses") if not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        if not out and self.cp % self.ulysses:
            out.append(f"parallel.ulysses={self.ulysses} must divide parallel.cp={self.cp} "
                       f"(cp = ulysses * ring size)")
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
        """Mesh coordinates of a global rank (``cp = cp_ring * ulysses + cp_ulysses``)."""
        cp = (rank // self.tp) % self.cp
        return {"dp": rank // (self.cp * self.tp), "cp": cp, "tp": rank % self.tp,
                "cp_ring": cp // self.ulysses, "cp_ulysses": cp % self.ulysses}

    def rank_of(self, dp: int, cp: int, tp: int) -> int:
        return (dp * self.cp + cp) * self.tp + tp


class Traffic:
    """Bytes this process sent, by kind of message (``"ring_p2p"``, ``"all_to_all"``, ...): the one
    byte counter of the project.

    Counted where the communication is posted (:mod:`megaring.ring.comm`, :mod:`megaring.ulysses.comm`),
    so benchmarks and the cost model's checks read what really went out. Every :class:`Axis` has
    one (all the bytes sent over it); ring attention also adds its bytes to a counter its caller
    owns (``ring_attention(traffic=)``, the trainer's per-step K/V metric). Bytes a rank would send
    to itself (an all-to-all's own slice) are not counted.
    """

    def __init__(self):
        self.bytes_sent: dict[str, int] = {}

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)

    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()

    def take(self) -> int:
        """The total so far, and reset (the trainer reads its counter once per step)."""
        total = self.total()
        self.reset()
        return total


@dataclass(frozen=True)
class Axis:
    """One mesh axis as seen by this rank: its group, this rank's index in it, its size, and the
    bytes sent over it (:class:`Traffic`)."""

    name: str
    group: dist.ProcessGroup | None
    rank: int
    size: int
    ranks: tuple[int, ...]  # global ranks of the group, in group-rank order
    traffic: Traffic = field(default_factory=Traffic, compare=False, repr=False)

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
    """Axes ``dp``, ``cp``, ``tp`` and ``dp_cp`` of the running job, and cp's factors ``cp_ulysses``
    (the Ulysses all-to-all group) and ``cp_ring`` (the ring); without them, cp is all ring."""

    dims: ParallelDims
    rank: int
    dp: Axis
    cp: Axis
    tp: Axis
    dp_cp: Axis
    device_mesh: object | None = None  # torch DeviceMesh when distributed
    cp_ulysses: Axis | None = None
    cp_ring: Axis | None = None

    def __post_init__(self):
        if self.cp_ulysses is None:
            object.__setattr__(self, "cp_ulysses", Axis.single("cp_ulysses", self.rank))
        if self.cp_ring is None:
            object.__setattr__(self, "cp_ring", self.cp)

    @classmethod
    def single(cls) -> ParallelMesh:
        """The trivial mesh of a single process (no process groups)."""
        return cls(ParallelDims(), 0, *(Axis.single(n) for n in ("dp", "cp", "tp", "dp_cp")))

    def axis(self, name: str) -> Axis:
        return getattr(self, name)

    def describe(self) -> str:
        d = self.dims
        cp = f"cp={d.cp}" + (f" (ulysses={d.ulysses} x ring={d.ring})" if d.ulysses > 1 else "")
        return f"dp={d.dp} {cp} tp={d.tp} (world {d.world_size})"


def group_ranks(dims: ParallelDims, rank: int, axes: tuple[str, ...]) -> tuple[int, ...]:
    """Global ranks sharing every coordinate of ``rank`` except those in ``axes``, in group order."""
    me = dims.coords(rank)
    fixed = [a for a in ("dp", *CP_AXES, "tp") if a not in axes and not (a in CP_AXES and "cp" in axes)]
    members = []
    for r in range(dims.world_size):
        c = dims.coords(r)
        if all(c[a] == me[a] for a in fixed):
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

    names = ("dp", *CP_AXES, "tp")
    mesh = init_device_mesh(device_type, (dims.dp, dims.ring, dims.ulysses, dims.tp), mesh_dim_names=names)
    cp = mesh[CP_AXES]._flatten("cp")
    flat = mesh[("dp", *CP_AXES)]._flatten("dp_cp")
    axes = {}
    for name, sub, members in (
        ("dp", mesh["dp"], ("dp",)),
        ("cp", cp, ("cp",)),
        ("tp", mesh["tp"], ("tp",)),
        ("dp_cp", flat, ("dp", "cp")),
        ("cp_ring", mesh["cp_ring"], ("cp_ring",)),
        ("cp_ulysses", mesh["cp_ulysses"], ("cp_ulysses",)),
    ):
        ranks = group_ranks(dims, rank, members)
        group = sub.get_group()
        if timeout_s is not None:
            _set_timeout(group, timeout_s)
        axes[name] = Axis(name, group, ranks.index(rank), len(ranks), ranks)
    return ParallelMesh(dims, rank, axes["dp"], axes["cp"], axes["tp"], axes["dp_cp"], mesh,
                        cp_ulysses=axes["cp_ulysses"], cp_ring=axes["cp_ring"])


def build_cp_subaxis(mesh: ParallelMesh, size: int, timeout_s: float | None = 600.0) -> Axis:
    """This rank's block of ``size`` consecutive cp ranks as an axis of its own (``parallel.dynamic_cp``).

    Every cp group (one per dp x tp coordinate) is cut into ``cp / size`` blocks, each a process
    group; block ``j`` of a cp group holds its ranks ``[j * size, (j + 1) * size)``. Collective
    over the world (every rank creates every block's group, in the same order), so call it on
    every rank at start-up with the same ``size``; ``size = cp`` is the cp axis itself and
    ``size = 1`` needs no group. cp must be all ring (``ulysses = 1``).
    """
    dims = mesh.dims
    if size == dims.cp:
        return mesh.cp
    if dims.cp % size or dims.ulysses != 1:
        raise ValueError(f"a cp sub-group of {size} ranks needs cp={dims.cp} divisible by it and ulysses=1")
    if size == 1:
        return Axis.single("cp1", mesh.rank)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    mine = None
    for dp in range(dims.dp):
        for tp in range(dims.tp):
            ring = [dims.rank_of(dp, c, tp) for c in range(dims.cp)]
            for first in range(0, dims.cp, size):
                ranks = tuple(ring[first:first + size])
                group = dist.new_group(list(ranks), timeout=timeout)
                if mesh.rank in ranks:
                    mine = Axis(f"cp{size}", group, ranks.index(mesh.rank), size, ranks)
    return mine


def _set_timeout(group: dist.ProcessGroup, timeout_s: float) -> None:
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.3
    if setter is not None:
        setter(datetime.timedelta(seconds=timeout_s), group)
