"""Run the training in this process, or spawn the local workers when no launcher started us.

``parallel.nproc_per_node=N`` (or ``auto``: dp * cp * tp) without torchrun / deepspeed / srun
starts N worker processes on this machine (rank = local rank), each running
:func:`megaring.train.trainer.train`. If one dies, the others are stopped and the parent exits
with an error naming the rank, so a single command works on a laptop and inside a Hydra sweep,
and never hangs on a lost rank.

Signals: the parent forwards SIGTERM, SIGUSR1 and SIGINT to the workers (which save at the next
step boundary, see :mod:`megaring.ops.preempt`) and exits with their status. A worker that
stops on purpose (bad input 2, diverged 3) writes its one-line reason to a file of the parent's,
which prints it once however many ranks said it, and adds no traceback; an input error on one rank
also outranks the crashes it causes on the others (their peer left). A preempted worker
(``trainer.preempt_exit_code``) has said where it saved. Under an external launcher each rank
prints its own reason (a config error: rank 0 only, it is every rank's).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
from multiprocessing.connection import wait
from pathlib import Path

import torch.multiprocessing as mp

from megaring.checkpoint.rundir import check_free
from megaring.checkpoint.steps import CheckpointError
from megaring.checkpoint.universal import UniversalError
from megaring.data.store import StoreError
from megaring.distributed.env import read_launch_env
from megaring.distributed.flight import REPORT_NAME, timeout_message, write_hang_line
from megaring.errors import BadInput
from megaring.ops.preempt import SIGNALS, Preempted
from megaring.train.config import TrainConfig
from megaring.train.config_checks import ConfigError, validate
from megaring.train.guards import DIVERGED_EXIT_CODE, Diverged
from megaring.train.trainer import checkpoint_dir, train

CONFIG_EXIT_CODE = 2
HANG_EXIT_CODE = 4  # a collective timed out (hang_report.json names the stalled rank or the lost host)


class WorkerFailed(RuntimeError):
    """A spawned worker exited with an error; the others were stopped."""


def launch(cfg: TrainConfig, run_dir: Path, hydra_files: dict[str, str] | None = None, job=None) -> int:
    """Run (or spawn) the training; returns the exit status (see docs/training.md, "When things go wrong").

    ``hydra_files``: Hydra's record of the command, written into the run directory by rank 0 once it
    holds the locks (:func:`megaring.checkpoint.rundir.write_hydra_files`). ``job``: what each worker
    runs instead of :func:`train`, called the same way (a picklable callable; its ``prog`` attribute
    names the command in messages), e.g. ``megaring-eval``'s."""
    try:
        n = cfg.parallel.local_workers()
    except ValueError as err:
        raise ConfigError.listing([str(err)]) from None
    if n > 0 and read_launch_env().launcher == "none":
        validate(cfg, n)  # fail fast in the parent; the workers check again
        check_free(run_dir, checkpoint_dir(cfg, run_dir), cfg.trainer.max_steps > 0)
        return spawn_workers(cfg, run_dir, n, hydra_files, job)
    return run_and_report(cfg, run_dir, read_launch_env().rank, hydra_files=hydra_files, job=job)


def spawn_workers(cfg: TrainConfig, run_dir: Path, nprocs: int, hydra_files: dict[str, str] | None = None,
                  job=None) -> int:
    with tempfile.TemporaryDirectory(prefix="megaring-reasons-") as reasons:
        return _spawn_and_join(cfg, run_dir, nprocs, Path(reasons), hydra_files, job)


def _spawn_and_join(cfg: TrainConfig, run_dir: Path, nprocs: int, reasons: Path,
                    hydra_files: dict[str, str] | None, job=None) -> int:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    context = mp.start_processes(_worker, args=(nprocs, port, threads, cfg, run_dir, reasons, hydra_files, job),
                                 nprocs=nprocs, join=False, start_method="spawn")
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
    rank, code = blamed_failure(failure, [p.exitcode for p in context.processes], reasons)
    said = worker_reasons(reasons, rank, nprocs)
    if said:
        print("\n".join(said), file=sys.stderr, flush=True)
    if code in (CONFIG_EXIT_CODE, DIVERGED_EXIT_CODE, HANG_EXIT_CODE, cfg.trainer.preempt_exit_code) or signalled:
        return code if code > 0 else 128 - code  # the worker said why; -N: killed by signal N
    what = "training" if job is None else prog_of(job)
    raise WorkerFailed(f"{what} worker rank {rank} failed ({describe_exit(code)}) and the other workers were "
                       f"stopped{worker_traceback(context.error_files[rank])}")


def reason_file(reasons: Path, rank: int) -> Path:
    return reasons / f"rank{rank}.txt"


def blamed_failure(first: tuple[int, int], exit_codes: list[int | None], reasons: Path) -> tuple[int, int]:
    """``(rank, exit code)`` to report: the first failure, unless it crashed (exit status 1: an exception
    escaped) and a rank stopped for bad input (a rank that leaves on an input error breaks its peers'
    next collective)."""
    if first[1] != 1:
        return first
    for other, other_code in enumerate(exit_codes):
        if other_code == CONFIG_EXIT_CODE and reason_file(reasons, other).is_file():
            return other, other_code
    return first


def worker_reasons(reasons: Path, rank: int, nprocs: int) -> list[str]:
    """The reasons the workers wrote, each once: ``rank``'s first, then any other rank's that differ."""
    order = [rank, *(r for r in range(nprocs) if r != rank)]
    said = [reason_file(reasons, r).read_text().rstrip("\n") for r in order if reason_file(reasons, r).is_file()]
    return list(dict.fromkeys(said))


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
            reasons: Path, hydra_files: dict[str, str] | None, job=None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    exit_now(run_and_report(cfg, run_dir, rank, reason_file(reasons, rank), hydra_files, job))


def exit_now(code: int) -> None:
    """End this worker process with ``code`` once its output is flushed, skipping the interpreter's teardown.

    The run is over (checkpoint written, process group destroyed), but DeepSpeed's module globals still
    hold the gloo process groups; when the interpreter frees them at exit, a gloo worker thread can be
    destroyed while joinable and abort the process (``terminate called without an active exception``,
    SIGABRT), turning a finished run into a failed one, rarely (seen once in CI, in none of 18 local
    runs). A spawned worker is a process of its own, so nothing after this point is ours to run. (An
    exception escaping the training still takes torch's path, which records its traceback for the
    parent.)"""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more to say
            pass
    os._exit(code)


def prog_of(job) -> str:
    return getattr(job, "prog", "megaring-train")


def run_and_report(cfg: TrainConfig, run_dir: Path, rank: int, reason: Path | None = None,
                   hydra_files: dict[str, str] | None = None, job=None) -> int:
    """Train (or run ``job``); a deliberate stop becomes its exit status and one message, written to
    ``reason`` (a spawned worker: the parent prints it) or printed (rank 0's, or every rank's when it
    may differ)."""
    prog = prog_of(job)

    def say(message: str, every_rank: bool) -> None:
        if reason is not None:
            reason.write_text(message + "\n")
        elif rank == 0 or every_rank:
            print(message, file=sys.stderr, flush=True)

    try:
        (job or train)(cfg, run_dir, hydra_files)
        return 0
    except Preempted as err:
        return err.exit_code  # rank 0 has said where it saved
    except (BadInput, CheckpointError, StoreError, UniversalError) as err:  # the user's to fix: the message only
        say(f"{prog}: {err}", every_rank=not isinstance(err, ConfigError))  # (config errors: every rank's)
        return CONFIG_EXIT_CODE
    except Diverged as err:
        say(f"{prog}: training diverged: {err}", every_rank=False)
        return DIVERGED_EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler was installed
        return 128 + signal.SIGINT
    except RuntimeError as err:  # torch.distributed's timeout errors derive from it
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        report = write_hang_line(run_dir, rank, read_launch_env().world_size, "a collective timed out")
        print(f"{prog}: {timeout_message(report, rank, cfg.parallel.timeout_s)} (see {run_dir / REPORT_NAME})",
              file=sys.stderr, flush=True)
        return HANG_EXIT_CODE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
