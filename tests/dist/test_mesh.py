"""The 3D mesh on 8 gloo processes: coordinates, group membership, dp_cp, collectives per axis."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megaring.distributed import ParallelDims, build_mesh


def _mesh_task(rank, world, dp, cp, tp):
    mesh = build_mesh(ParallelDims(dp=dp, cp=cp, tp=tp), timeout_s=30)
    out = {}
    for name in ("dp", "cp", "tp", "dp_cp"):
        axis = mesh.axis(name)
        # Membership as torch sees it: gather global ranks over the axis group.
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(axis.size)]
        dist.all_gather(gathered, torch.tensor([rank]), group=axis.group)
        out[name] = (axis.rank, axis.size, axis.ranks, tuple(int(t) for t in gathered))
    return out


def test_2x2x2_layout(pools):
    results = pools(8).run(_mesh_task, 2, 2, 2)
    dims = ParallelDims(2, 2, 2)
    for rank, axes in enumerate(results):
        c = dims.coords(rank)
        assert rank == (c["dp"] * 2 + c["cp"]) * 2 + c["tp"]
        assert axes["tp"][2] == tuple(range(rank - c["tp"], rank - c["tp"] + 2))  # tp innermost: neighbours
        assert axes["cp"][2] == tuple(dims.rank_of(c["dp"], i, c["tp"]) for i in range(2))
        assert axes["dp"][2] == tuple(dims.rank_of(i, c["cp"], c["tp"]) for i in range(2))
        assert axes["dp_cp"][2] == tuple(dims.rank_of(d, q, c["tp"]) for d in range(2) for q in range(2))
        for name, (axis_rank, size, ranks, seen) in axes.items():
            assert seen == ranks, f"rank {rank} axis {name}: torch group {seen} != {ranks}"
            assert ranks[axis_rank] == rank and size == len(ranks)
    assert results[5]["dp_cp"][2] == (1, 3, 5, 7)


def test_other_shapes_on_8(pools):
    results = pools(8).run(_mesh_task, 1, 4, 2)
    assert results[0]["cp"][2] == (0, 2, 4, 6)
    assert results[3]["tp"][2] == (2, 3)
    assert results[3]["dp"][2] == (3,)


def _bad_mesh_task(rank, world):
    try:
        build_mesh(ParallelDims(dp=3, cp=2, tp=1))
    except ValueError as err:
        return str(err)
    return ""


def test_validation_error_names_all_numbers(pools):
    for msg in pools(8).run(_bad_mesh_task):
        assert "3*2*1 = 6" in msg and "world size 8" in msg


@pytest.mark.parametrize("dims,world,fragments", [
    (ParallelDims(0, 2, 1), 2, ["parallel.dp=0 must be an integer >= 1"]),
    (ParallelDims(0, -1, 1), 2, ["parallel.dp=0", "parallel.cp=-1"]),
    (ParallelDims(2, 2, 2), 4, ["2*2*2 = 8", "world size 4"]),
])
def test_dims_problems(dims, world, fragments):
    with pytest.raises(ValueError) as err:
        dims.validate(world)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_ulysses_inside_cp_on_8(pools):
    """cp=4 as ring 2 x ulysses 2: Ulysses innermost (neighbouring cp ranks), the ring across."""
    results = pools(8).run(_ulysses_mesh_task, 2, 4, 1, 2)
    dims = ParallelDims(2, 4, 1, ulysses=2)
    for rank, axes in enumerate(results):
        c = dims.coords(rank)
        assert c["cp"] == c["cp_ring"] * 2 + c["cp_ulysses"]
        assert axes["cp"][2] == tuple(range(4 * c["dp"], 4 * c["dp"] + 4))
        first = 4 * c["dp"] + 2 * c["cp_ring"]
        assert axes["cp_ulysses"][2] == (first, first + 1)
        assert axes["cp_ring"][2] == (4 * c["dp"] + c["cp_ulysses"], 4 * c["dp"] + c["cp_ulysses"] + 2)
        assert axes["dp_cp"][2] == tuple(range(8))
        for name, (axis_rank, size, ranks, seen) in axes.items():
            assert seen == ranks, f"rank {rank} axis {name}: torch group {seen} != {ranks}"


def _ulysses_mesh_task(rank, world, dp, cp, tp, ulysses):
    mesh = build_mesh(ParallelDims(dp=dp, cp=cp, tp=tp, ulysses=ulysses), timeout_s=30)
    out = {}
    for name in ("cp", "dp_cp", "cp_ring", "cp_ulysses"):
        axis = mesh.axis(name)
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(axis.size)]
        dist.all_gather(gathered, torch.tensor([rank]), group=axis.group)
        out[name] = (axis.rank, axis.size, axis.ranks, tuple(int(t) for t in gathered))
    return out


@pytest.mark.parametrize("dims,fragments", [
    (ParallelDims(1, 4, 1, ulysses=3), ["parallel.ulysses=3 must divide parallel.cp=4"]),
    (ParallelDims(1, 4, 1, ulysses=0), ["parallel.ulysses=0 must be an integer >= 1"]),
])
def test_ulysses_dims_problems(dims, fragments):
    with pytest.raises(ValueError) as err:
        dims.validate(4)
    for fragment in fragments:
        assert fragment in str(err.value)
