"""Run directory safety: one run at a time, no silently discarded history, no silent config changes.

- :class:`RunLock`: an exclusive ``flock`` on ``<run dir>/megaring.lock``, held by global rank 0
  for the whole run (the kernel drops it when the process dies, so a crashed run never leaves a
  stale lock). The file names the holder (host, pid, start time) for the run that finds it taken.
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
    """Another live run holds the run directory's lock."""


class RunLock:
    """Exclusive lock on a run directory; :meth:`acquire` raises :class:`RunDirBusy` naming the holder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirBusy(f"run directory {self.path.parent} is in use by another run ({holder}; lock "
                             f"{self.path}): wait for it to end, stop it, or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_free(run_dir: Path) -> None:
    """Fail now if another run holds ``run_dir`` (the spawner's early check; rank 0 locks it)."""
    RunLock(run_dir).acquire().release()


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
