"""Read rank, world size and rendezvous address from the launcher's environment.

Understands torchrun and the ``deepspeed`` launcher (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and slurm's ``srun``
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, first host of ``SLURM_JOB_NODELIST``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (or deepspeed: same variables), "slurm" or "none"

    def export(self) -> None:
        """Write the torch.distributed variables so env:// init and DeepSpeed agree."""
        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
        )


def first_host(nodelist: str) -> str:
    """First host of a slurm node list such as ``gpu[007-009,012],cpu01``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, bracket = head.group(1), head.group(3)
    if not bracket:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            int(env.get("MASTER_PORT", DEFAULT_PORT + job % 10000)), "slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "none")
