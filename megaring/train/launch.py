"""Run the training in this process, or spawn the local workers when no launcher started us.

``parallel.nproc_per_node=N`` (or ``auto``: dp * cp * tp) without torchrun / deepspeed / srun
starts N worker processes on this machine (rank = local rank), each running
:func:`megaring.train.trainer.train`. If one dies, the others are stopped and the parent exits
with an error naming the rank, so a single command works on a laptop and inside a Hydra sweep,
and never hangs on a lost rank.

Signals: the parent forwards SIGTERM, SIGUSR1 and SIGINT to the workers (which save at the next
step boundary, see :mod:`megaring.train.preempt`) and exits with their status. A worker that
stops on purpose (config error 2, diverged 3, preempted: ``trainer.preempt_exit_code``) prints its
own one-line reason; the parent adds no traceback.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
from multiprocessing.connection import wait
from pathlib import Path

import torch.multiprocessing as mp

from megaring.data.store import StoreError
from megaring.distributed.flight import REPORT_NAME, write_hang_line
from megaring.distributed.launch_env import read_launch_env
from megaring.train.checkpoint import CheckpointError
from megaring.train.config import TrainConfig
from megaring.train.guards import DIVERGED_EXIT_CODE, Diverged
from megaring.train.preempt import SIGNALS, Preempted
from megaring.train.rundir import check_free
from megaring.train.trainer import checkpoint_dir, train
from megaring.train.universal import UniversalError
from megaring.train.validate import ConfigError, validate

CONFIG_EXIT_CODE = 2
HANG_EXIT_CODE = 4  # a collective timed out (hang_report.json names the stalled rank)


class WorkerFailed(RuntimeError):
    """A spawned worker exited with an error; the others were stopped."""


def launch(cfg: TrainConfig, run_dir: Path, hydra_files: dict[str, str] | None = None) -> int:
    """Run (or spawn) the training; returns the exit status (see docs/training.md, "When things go wrong").

    ``hydra_files``: Hydra's record of the command, written into the run directory by rank 0 once it
    holds the locks (:func:`megaring.train.rundir.write_hydra_files`)."""
    try:
        n = cfg.parallel.local_workers()
    except ValueError as err:
        raise ConfigError.listing([str(err)]) from None
    if n > 0 and read_launch_env().launcher == "none":
        validate(cfg, n)  # fail fast in the parent; the workers check again
        check_free(run_dir, checkpoint_dir(cfg, run_dir))
        return spawn_workers(cfg, run_dir, n, hydra_files)
    return run_and_report(cfg, run_dir, read_launch_env().rank, hydra_files)


def spawn_workers(cfg: TrainConfig, run_dir: Path, nprocs: int, hydra_files: dict[str, str] | None = None) -> int:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    context = mp.start_processes(_worker, args=(nprocs, port, threads, cfg, run_dir, hydra_files), nprocs=nprocs,
                                 join=False, start_method="spawn")
    signalled: list[int] = []

    def forward(signum, frame) -> None:
        signalled.append(signum)
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (*SIGNALS, signal.SIGUSR2)}  # USR2: hang report
    try:
        failure = join_workers(context.processes, deliberate={CONFIG_EXIT_CODE, DIVERGED_EXIT_CODE,
                                                              cfg.trainer.preempt_exit_code})
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure is None:
        return 0
    rank, code = failure
    if code in (CONFIG_EXIT_CODE, DIVERGED_EXIT_CODE, HANG_EXIT_CODE, cfg.trainer.preempt_exit_code) or signalled:
        return code if code > 0 else 128 - code  # the worker said why; -N: killed by signal N
    raise WorkerFailed(f"training worker rank {rank} failed ({describe_exit(code)}) and the other workers were "
                       f"stopped{worker_traceback(context.error_files[rank])}")


def join_workers(processes: list, deliberate: set[int]) -> tuple[int, int] | None:
    """Wait for every worker; at the first non-zero exit stop the others (at once after a crash; after
    up to 30 s after a deliberate exit, which the others are making too). Returns ``(rank, exit code)``
    of the first failure, or None."""
    pending = {p.sentinel: rank for rank, p in enumerate(processes)}
    while pending:
        for sentinel in wait(list(pending)):
            rank = pending.pop(sentinel)
            processes[rank].join()
            code = processes[rank].exitcode
            if code != 0:
                stop_workers(processes, grace_s=30.0 if code in deliberate else 0.0)
                return rank, code
    return None


def stop_workers(processes: list, grace_s: float) -> None:
    for p in processes:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join()


def describe_exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def worker_traceback(error_file: str) -> str:
    """The failed worker's traceback, when it raised (torch's spawn writes it there)."""
    try:
        with open(error_file, "rb") as fh:
            return ": " + pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError):
        return ""


def _worker(rank: int, nprocs: int, port: int, threads: int, cfg: TrainConfig, run_dir: Path,
            hydra_files: dict[str, str] | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.exit(run_and_report(cfg, run_dir, rank, hydra_files))


def run_and_report(cfg: TrainConfig, run_dir: Path, rank: int, hydra_files: dict[str, str] | None = None) -> int:
    """Train; a deliberate stop becomes its exit status and one message (rank 0's, or the only rank's)."""
    try:
        train(cfg, run_dir, hydra_files)
        return 0
    except Preempted as err:
        return err.exit_code  # rank 0 has said where it saved
    except (ConfigError, CheckpointError, StoreError, UniversalError) as err:
        if rank == 0 or not isinstance(err, ConfigError):  # (config errors are every rank's)
            print(f"megaring-train: {err}", file=sys.stderr, flush=True)
        return CONFIG_EXIT_CODE
    except Diverged as err:
        if rank == 0:
            print(f"megaring-train: training diverged: {err}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler was installed
        return 128 + signal.SIGINT
    except RuntimeError as err:  # torch.distributed's timeout errors derive from it
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        report = write_hang_line(run_dir, rank, read_launch_env().world_size, "a collective timed out")
        stalled = report["stalled_ranks"] or "not identified"
        print(f"megaring-train: rank {rank}: a collective timed out after parallel.timeout_s="
              f"{cfg.parallel.timeout_s:g} s; stalled rank(s): {stalled} (see {run_dir / REPORT_NAME})",
              file=sys.stderr, flush=True)
        return HANG_EXIT_CODE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
