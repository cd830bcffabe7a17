"""Run directory safety: one run at a time, no silently discarded history, no silent config changes.

- :class:`RunLock`: an exclusive ``flock`` on ``<run dir>/megaring.lock``, held by global rank 0
  for the whole run (the kernel drops it when the process dies, so a crashed run never leaves a
  stale lock). The file names the holder (host, pid, start time) for the run that finds it taken.
  :class:`CheckpointDirLock` does the same on ``trainer.ckpt_dir``, so two runs in different run
  directories cannot share one checkpoint directory; both check that their directory can be written.
- :class:`RunLocks`: both locks, taken by global rank 0 before anything is read or written;
  :func:`write_hydra_files` writes Hydra's record of the command (``.hydra/``) only once they are held.
- :func:`data_identity_problems`: resuming on another token store than the checkpoint's.
- :func:`history_problems`: ``trainer.resume=false`` where checkpoints already exist is refused.
- :func:`config_change_problems`: resuming with a config whose results differ from the checkpoint's
  (the keys of :func:`result_config`) names each differing key; ``trainer.resume_allow_changes``
  lists the ones the user changes on purpose.
- :func:`lr_horizon`: the learning-rate schedule's horizon is the one the run started with.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megaring.checkpoint.steps import TrainerState
from megaring.errors import ConfigError
from megaring.train.config import RUN_NEUTRAL_KEYS, TrainConfig

LOCK_FILE = "megaring.lock"
# Sections whose values change what a run computes; parallel.* may change (checkpoints convert
# between layouts), eval.* and logging.* do not change the training.
RESULT_SECTIONS = ("model", "data", "optim", "trainer")
# Handled apart (the schedule horizon: lr_horizon), or where files go and how they are checked.
NOT_COMPARED = ("optim.decay_steps", "trainer.ckpt_dir", "model.init_from", "data.index_dir", "data.verify_checksum",
                "trainer.micro_batch_size")  # the step's gradient is the exact global mean at any micro-batch size


class RunDirBusy(ConfigError):
    """Another live run holds the run (or checkpoint) directory's lock."""


class RunLock:
    """Exclusive lock on a run directory; :meth:`acquire` raises :class:`RunDirBusy` naming the holder,
    and a :class:`ConfigError` when the directory cannot be written."""

    what, change = "run directory", "hydra.run.dir"

    def __init__(self, directory: Path, owner: Path | None = None):
        self.path = Path(directory) / LOCK_FILE
        self.owner = owner  # the run directory of the holder, written into the lock file
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(unwritable(self.what, directory, err, self.change)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirBusy(f"{self.what} {directory} is in use by another run ({holder}; lock {self.path}): "
                             f"wait for it to end, stop it, or choose another {self.change}") from None
        self.fd = fd
        problem = write_problem(directory, self.what, self.change)  # the lock file may exist in a read-only dir
        if problem:
            self.release()
            raise ConfigError(problem)
        os.ftruncate(fd, 0)
        owner = f", run directory {self.owner}" if self.owner is not None else ""
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}{owner}"
                     .encode())
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class CheckpointDirLock(RunLock):
    """Exclusive lock on ``trainer.ckpt_dir`` (also the default ``<run dir>/checkpoints``: another run
    may name it as its ``trainer.ckpt_dir``)."""

    what, change = "checkpoint directory", "trainer.ckpt_dir"


def unwritable(what: str, directory: Path, err: OSError, change: str) -> str:
    reason = err.strerror or str(err)
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        blocking = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), directory)
        reason = f"{blocking} is a file, not a directory"
    return (f"the {what} {directory} cannot be written ({reason}): make it writable, or choose another "
            f"{change}")


def write_problem(directory: Path, what: str, change: str) -> str | None:
    """None when a new file can be created in ``directory`` (checked now, not at the first save)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".megaring-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return unwritable(what, directory, err, change)
    return None


class RunLocks:
    """The run directory's and the checkpoint directory's locks, held by global rank 0 for the run."""

    def __init__(self, run_dir: Path, ckpt_dir: Path, saves: bool = True):
        self.locks = [RunLock(run_dir)]
        # One lock file when they coincide (the run lock covers it); a run that saves nothing (an
        # eval-only run) locks only a checkpoint directory that exists, and creates none.
        if Path(ckpt_dir).resolve() != Path(run_dir).resolve() and (saves or Path(ckpt_dir).is_dir()):
            self.locks.append(CheckpointDirLock(ckpt_dir, owner=run_dir))

    def acquire(self) -> RunLocks:
        for i, lock in enumerate(self.locks):
            try:
                lock.acquire()
            except ConfigError:
                for held in self.locks[:i]:
                    held.release()
                raise
        return self

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()


def check_free(run_dir: Path, ckpt_dir: Path | None = None, saves: bool = True) -> None:
    """Fail now if another run holds ``run_dir`` or ``ckpt_dir``, or either cannot be written (the
    spawner's early check; rank 0 locks them)."""
    RunLocks(run_dir, ckpt_dir if ckpt_dir is not None else run_dir, saves).acquire().release()


HYDRA_DIR = ".hydra"


def write_hydra_files(run_dir: Path, files: dict[str, str]) -> None:
    """Hydra's record of the command (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``) into
    ``<run dir>/.hydra``, each replaced atomically.

    configs/config.yaml sets ``hydra.output_subdir: null``: Hydra would write these files before any
    of our code runs, so a second run that the lock then refuses would already have rewritten the
    live run's record. The entry point renders the same files (:func:`megaring.cli.train.hydra_files`)
    and global rank 0 writes them here once it holds the locks and the config is valid."""
    out = run_dir / HYDRA_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def history_problems(cfg: TrainConfig, latest: TrainerState | None, ckpt_dir: Path) -> list[str]:
    if cfg.trainer.resume or latest is None:
        return []
    return [f"trainer.resume=false, but {ckpt_dir} holds checkpoints of an earlier run (latest: step "
            f"{latest.step}): starting over would discard them and its metrics. Choose another hydra.run.dir "
            "(or trainer.ckpt_dir), or remove that directory to start over, or resume (trainer.resume=true)"]


def result_config(cfg: TrainConfig) -> dict[str, Any]:
    """The flattened ``section.key`` values that change what a run computes (saved in checkpoints)."""
    d = asdict(cfg)
    flat = {}
    for section in RESULT_SECTIONS:
        for key, value in _flatten(d[section], section).items():
            if key not in RUN_NEUTRAL_KEYS and key not in NOT_COMPARED:
                flat[key] = value
    return json.loads(json.dumps(flat))  # tuples as lists, as they come back from the checkpoint


def _flatten(d: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def config_change_problems(cfg: TrainConfig, saved: dict[str, Any] | None, where: Path,
                           skip: set[str] = frozenset()) -> list[str]:
    """Keys whose value differs from the checkpoint's config, unless listed in trainer.resume_allow_changes
    (or in ``skip``: reported elsewhere)."""
    if saved is None:  # a checkpoint from before configs were recorded
        return []
    ours, allowed = result_config(cfg), set(cfg.trainer.resume_allow_changes) | set(skip)
    differing = sorted(k for k in set(ours) | set(saved) if k not in allowed and ours.get(k) != saved.get(k))
    if not differing:
        return []
    listed = ", ".join(f"{k}={ours.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in differing)
    return [f"resuming {where} with a config that changes the results: {listed}. Restore those values, or "
            f"allow the change with trainer.resume_allow_changes=[{','.join(differing)}]"]


DATA_STORE_KEY = "data.store"  # trainer.resume_allow_changes=[data.store]: resume on another token store


def data_identity_problems(cfg: TrainConfig, identity: dict | None, saved: dict | None, where: Path) -> list[str]:
    """The token store at ``data.path`` is the one the checkpoint was trained on (its recorded
    :func:`megaring.data.store_identity`), unless ``data.store`` is in trainer.resume_allow_changes."""
    if saved is None or identity is None or DATA_STORE_KEY in cfg.trainer.resume_allow_changes:
        return []
    differing = [k for k in sorted(set(saved) | set(identity)) if k != "path" and saved.get(k) != identity.get(k)]
    if not differing:
        return []
    listed = ", ".join(f"{k} {identity.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in differing)
    return [f"resuming {where} on another token store: data.path={identity.get('path')} holds {listed}; the "
            f"checkpoint was trained on {saved.get('path')}. Point data.path at that store, or accept the new data "
            f"with trainer.resume_allow_changes=[{DATA_STORE_KEY}]"]


def lr_horizon(cfg: TrainConfig, saved: TrainerState | None) -> tuple[int, str | None]:
    """The decay horizon of the learning-rate schedule and a note when it is not the checkpoint's.

    ``optim.decay_steps`` when set; else the horizon the run started with (recorded in its
    checkpoints), so raising ``trainer.max_steps`` extends a run without a jump in the rate; else
    ``trainer.max_steps``.
    """
    explicit, recorded = cfg.optim.decay_steps, saved.lr_horizon if saved is not None else None
    horizon = explicit or recorded or cfg.trainer.max_steps
    if recorded is not None and horizon != recorded:
        return horizon, (f"learning-rate schedule horizon changed from {recorded} steps (checkpoint) to {horizon} "
                         f"(optim.decay_steps={explicit})")
    return horizon, None
