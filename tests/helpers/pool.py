"""A pool of gloo worker processes that stays up for a whole test module.

Starting processes and importing torch costs seconds per rank; a module-scoped pool pays
it once and then runs many small distributed cases. Each task is a picklable module-level
function ``fn(rank, world_size, *args)``; every rank runs it and the pool returns the list
of per-rank results. A failing rank raises in the test with its traceback; a hang ends
after ``timeout_s`` (collectives also time out), and the pool is torn down. A closed pool's
workers leave without the interpreter's teardown (see :func:`_worker`).

Workers are forked from multiprocessing's forkserver, one process for the whole session that
imports torch, DeepSpeed and megaring once (:data:`PRELOAD`; it starts with the first pool): a
spawned worker imported them itself, several seconds of CPU per rank (a world-8 pool and its
first training took 20 s on 2 cores; forked, 10 s). Each worker starts with the environment the
pool was made in, as a spawned one would, not the server's.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import sys
import traceback

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60
# Imported once by the forkserver (before any thread or collective exists there), so that every
# worker forked from it has torch and megaring's trainer already. A module of ours that guards its
# imports: the forkserver itself would die on a broken one, and every pool with it, unexplained.
PRELOAD = ("tests.helpers.preload",)
CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(list(PRELOAD))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _worker(rank: int, world_size: int, port: int, env: dict[str, str], owner: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()  # the pool's environment, not the forkserver's (made with the first pool)
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue.Empty:
            if not _alive(owner):  # the test session was killed before it closed the pool: nobody to answer
                os._exit(0)
            continue
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: with torch, DeepSpeed and a module's meshes loaded it
    # costs each rank about a second of CPU, so closing a world-8 pool on 2 cores took ~9 s. Nothing
    # is pending: the parent read every result before it asked the pool to stop.
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class WorkerPool:
    def __init__(self, world_size: int, timeout_s: float = 180.0):
        self.world_size, self.timeout_s, self.closed = world_size, timeout_s, False
        self.results = CONTEXT.Queue()
        self.tasks = [CONTEXT.Queue() for _ in range(world_size)]
        port, env = free_port(), dict(os.environ)
        args = (world_size, port, env, os.getpid())
        self.procs = [CONTEXT.Process(target=_worker, args=(r, *args, self.tasks[r], self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args) -> list:
        """Run ``fn(rank, world_size, *args)`` on every rank; return results ordered by rank."""
        for q in self.tasks:
            q.put((fn, args))
        out: dict[int, object] = {}
        errors = []
        while len(out) + len(errors) < self.world_size:
            try:
                rank, ok, value = self.results.get(timeout=self.timeout_s)
            except queue.Empty:
                self.close(force=True)
                raise TimeoutError(f"{fn.__name__} did not finish on all {self.world_size} ranks "
                                   f"within {self.timeout_s}s (finished: {sorted(out)})") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            if len(errors) < self.world_size:  # ranks that succeeded may have left a collective half-done
                self.close(force=True)
            raise RuntimeError(f"{fn.__name__} failed\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def healthy(self) -> bool:
        """Every rank alive and the pool not torn down: safe to run the next task."""
        return not self.closed and all(p.is_alive() for p in self.procs)

    def close(self, force: bool = False) -> None:
        self.closed = True
        for p, q in zip(self.procs, self.tasks):
            if not force and p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
