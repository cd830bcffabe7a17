"""Start torch.distributed from the launcher environment, with timeouts on every collective.

:func:`init_distributed` is the one place a process group is started (and ``LOCAL_RANK`` exported,
which DeepSpeed requires); :func:`device_for` is the device a rank then computes on.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megaring.distributed.env import LaunchEnv, read_launch_env
from megaring.distributed.flight import FLIGHT
from megaring.distributed.net_iface import choose_interface
from megaring.distributed.rendezvous import rendezvous_problems
from megaring.errors import BadInput, problem_list

BACKENDS = ("nccl", "gloo")  # parallel.backend: null picks nccl on CUDA, gloo on CPU


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def backend_problems(backend: str | None) -> list[str]:
    """Why this machine cannot start ``backend`` (``parallel.backend``), saying what to set instead."""
    choices = "parallel.backend=gloo (CPU) or null (nccl on CUDA, gloo on CPU)"
    if backend is None:
        return []
    if backend not in BACKENDS:
        return [f"parallel.backend={backend!r} is not a backend megaring runs on ({', '.join(BACKENDS)}): "
                f"set parallel.backend=nccl (CUDA GPUs), {choices}"]
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        why = "no CUDA device is visible" if not torch.cuda.is_available() else "this torch was built without NCCL"
        return [f"parallel.backend=nccl needs CUDA GPUs and NCCL, and {why}: set {choices}"]
    if backend == "gloo" and not dist.is_gloo_available():
        return ["parallel.backend=gloo: this torch was built without gloo; set parallel.backend=nccl or null"]
    return []


def init_distributed(backend: str | None = None, timeout_s: float = 600.0, *,
                     single_process_group: bool = False, net_iface: str | None = None) -> LaunchEnv:
    """Initialise the default process group if the launcher started several processes.

    A single process without a launcher stays undistributed, unless ``single_process_group``
    asks for a one-rank group (DeepSpeed needs one). ``timeout_s`` bounds every collective, so a
    dead rank ends the job with an error instead of a hang. A group already up is left as it is.
    The network interface is ``net_iface`` or the route to the master address
    (:func:`~megaring.distributed.net_iface.choose_interface`, logged by each host's local rank 0).
    A master address that does not resolve, or (on the rank that starts the store) a busy master
    port, is a :class:`~megaring.errors.BadInput` naming it, before any rank waits on the rendezvous.
    """
    env = read_launch_env()
    if dist.is_initialized():
        return env
    backend = backend or default_backend()
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size > 1 or env.launcher != "none":
        env.export()
        check_rendezvous(env)
        choose_interface(env.master_addr, net_iface, announce=env.local_rank == 0)
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        others = tuple(r for r in range(env.world_size) if r != env.rank)
        what = (f"the {backend} process group's connections to every rank (MASTER_ADDR={env.master_addr}; "
                "each host logged its network interface, parallel.net_iface chooses another)")
        FLIGHT.at(phase="process group start")
        with FLIGHT.waiting(what, peers=others):
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    elif single_process_group:
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return env


def rank_hosts() -> list[str]:
    """Every rank's host name, by global rank: one all-gather over the world at start-up (hang reports)."""
    me = os.uname().nodename
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [me]
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, me)
    return [str(h) for h in hosts]


def check_rendezvous(env: LaunchEnv) -> None:
    """Rank 0 starts the store on ``MASTER_PORT``, except under torchrun, whose agent already listens there."""
    starts_store = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    problems = rendezvous_problems(env.master_addr, env.master_port, starts_store=starts_store)
    if problems:
        raise BadInput(problem_list(f"rank {env.rank}: the process group cannot start", problems))


def device_for(env: LaunchEnv, backend: str | None = None) -> torch.device:
    """The rank's device: its local GPU when CUDA is there (and the backend is not gloo), else the CPU."""
    if torch.cuda.is_available() and backend != "gloo":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")
