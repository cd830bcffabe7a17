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


def pytest_sessionstart(session):
    """Build DeepSpeed's shared-memory op (its first ``deepspeed.initialize`` JIT-compiles it, about
    35 s) once, here, before any test starts: a test that kills a training process during that build
    (a lost rank, a signal to torchrun) would leave DeepSpeed's build lock behind, and every later
    process would wait on it forever."""
    try:
        from deepspeed.comm.torch import build_shm_op
    except ImportError:  # DeepSpeed is not installed: the tests that need it say so
        return
    remove_stale_build_lock()
    build_shm_op()


def remove_stale_build_lock(older_than_s: float = 300.0) -> None:
    """The lock of an earlier session that was killed during the build (the build takes ~35 s; a
    lock this old belongs to no build in progress). torch's lock is a bare file, without a pid."""
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    if lock.is_file() and time.time() - lock.stat().st_mtime > older_than_s:
        print(f"removing {lock}: a stale build lock, {time.time() - lock.stat().st_mtime:.0f} s old")
        lock.unlink(missing_ok=True)
