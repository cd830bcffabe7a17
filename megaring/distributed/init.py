"""Start torch.distributed from the launcher environment, with timeouts on every collective."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from megaring.distributed.launch_env import LaunchEnv, read_launch_env


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> LaunchEnv:
    """Initialise the default process group if the launcher started several processes.

    A single process without a launcher stays undistributed. ``timeout_s`` bounds every
    collective, so a dead rank ends the job with an error instead of a hang.
    """
    env = read_launch_env()
    if dist.is_initialized() or env.world_size == 1 and env.launcher == "none":
        return env
    env.export()
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend, rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env
