import pytest
import torch

from tests.helpers.pool import WorkerPool


@pytest.fixture(scope="module")
def pools():
    """Module-scoped gloo worker pools, one per world size, created on first use and made again when a
    test broke one (a timeout tears a pool down). Not session-scoped: every mesh a task builds leaves
    its gloo groups (and their threads) in the workers, so a pool that lived for the whole suite
    would end with hundreds of threads per rank."""
    made: dict[int, WorkerPool] = {}

    def get(world_size: int) -> WorkerPool:
        if world_size not in made or not made[world_size].healthy():
            made[world_size] = WorkerPool(world_size)
        return made[world_size]

    yield get
    for pool in made.values():
        pool.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
