"""Run the training in this process, or spawn the local workers when no launcher started us.

``parallel.nproc_per_node=N`` (or ``auto``: dp * cp * tp) without torchrun / deepspeed / srun
starts N worker processes on this machine (rank = local rank), each running
:func:`megaring.train.trainer.train`. If one dies, the others are terminated and the parent exits
with an error naming the rank, so a single command works on a laptop and inside a Hydra sweep,
and never hangs on a lost rank.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from megaring.distributed.launch_env import read_launch_env
from megaring.train.config import TrainConfig
from megaring.train.trainer import train
from megaring.train.validate import ConfigError, validate


class WorkerFailed(RuntimeError):
    """A spawned worker exited with an error; the others were stopped."""


def launch(cfg: TrainConfig, run_dir: Path) -> None:
    try:
        n = cfg.parallel.local_workers()
    except ValueError as err:
        raise ConfigError.listing([str(err)]) from None
    if n > 0 and read_launch_env().launcher == "none":
        validate(cfg, n)  # fail fast in the parent; the workers check again
        spawn_workers(cfg, run_dir, n)
    else:
        train(cfg, run_dir)


def spawn_workers(cfg: TrainConfig, run_dir: Path, nprocs: int) -> None:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    try:
        mp.start_processes(_worker, args=(nprocs, port, threads, cfg, run_dir), nprocs=nprocs,
                           join=True, start_method="spawn")
    except ProcessException as err:
        raise WorkerFailed(f"training worker rank {err.error_index} failed and the other workers were "
                           f"stopped: {err}") from None


def _worker(rank: int, nprocs: int, port: int, threads: int, cfg: TrainConfig, run_dir: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    train(cfg, run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
