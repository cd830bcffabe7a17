"""Checkpoints that become visible only when complete, and resuming from the latest one.

Layout of ``ckpt_dir``::

    latest                   the tag of the newest complete checkpoint (replaced atomically)
    step_00000012/           the engine's model / optimizer files (:meth:`TrainEngine.save`),
                             trainer_state.json (step, consumed samples, layout), rng/rank_*.json,
                             universal/ (fp32 weights and Adam moments, every rank its own
                             pieces: any layout resumes from it and megaring-export reads it, see
                             megaring.checkpoint.universal; trainer.universal_every may leave it out)
    step_00000016.partial/   a save in progress (or killed): never read, removed by the next save
    megaring.lock            held by the run that writes here (megaring.checkpoint.rundir.CheckpointDirLock)

Every rank writes its own files into the ``.partial`` directory; after a barrier rank 0 renames it
(atomic on one file system), then points ``latest`` at it and prunes to ``keep_last``. A save
killed at any point leaves ``latest`` on the previous complete checkpoint. Our files are JSON and
the engine reads its own with ``torch.load(weights_only=True)``.

A ``step_*`` directory exists only once complete, so when ``latest`` is gone (deleted by hand) the
newest one is the checkpoint to resume from (:func:`find_latest` says so), never a fresh start.
Before a resume :func:`step_dir_problems` checks, without any collective, that the checkpoint's
files are whole: the engine's zip archives end in their central directory (a truncated file does
not) and every rank's RNG file parses; each problem names the file and the newest older checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from megaring.checkpoint.universal import save_universal
from megaring.ops.faults import NO_FAULT, Fault

PARTIAL = ".partial"
TAG_RE = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer updates done
    consumed_samples: int
    tokens_seen: int
    layout: dict  # dp, cp, tp, zero_stage (ParallelConfig.layout_key)
    lr_horizon: int | None = None  # the schedule's decay horizon (kept on resume); None: older checkpoints
    config: dict | None = None  # megaring.checkpoint.rundir.result_config at the save; None: older checkpoints
    data: dict | None = None  # the token store's identity (megaring.data.store_identity); None: mock, older


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Latest:
    """The checkpoint to resume from: its tag, and a note when ``latest`` was missing."""

    tag: str
    note: str | None = None


def step_tags(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints' tags, oldest first (``.partial`` directories are not)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def find_latest(ckpt_dir: Path) -> Latest | None:
    """What ``latest`` names or, when that file is missing, the newest complete step directory."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
            older = step_tags(ckpt_dir)
            raise CheckpointError(f"{latest} names {tag!r}, which is not a checkpoint in {ckpt_dir}: write the tag "
                                  f"of one that is into it ({', '.join(older) or 'there is none'}), or remove it"
                                  + (" to resume from the newest" if older else ""))
        return Latest(tag)
    tags = step_tags(ckpt_dir)
    if not tags:
        return None
    return Latest(tags[-1], f"{latest} is missing: resuming from the newest complete checkpoint, {tags[-1]}")


def read_latest(ckpt_dir: Path) -> str | None:
    found = find_latest(ckpt_dir)
    return found.tag if found else None


def read_trainer_state(ckpt_dir: Path) -> tuple[str, TrainerState] | None:
    """``(tag, state)`` of the checkpoint to resume from (:func:`find_latest`), or None when there is none."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    path = ckpt_dir / tag / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir / 'latest'} names a checkpoint without {path.name}: {path} is missing")
    try:
        return tag, TrainerState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupted ({err}); remove that checkpoint or point "
                              f"{ckpt_dir / 'latest'} at an older one") from None


def older_advice(ckpt_dir: Path, tag: str) -> str:
    """How to resume from the newest checkpoint older than ``tag`` (or that there is none)."""
    older = [t for t in step_tags(ckpt_dir) if t < tag]
    if not older:
        return (f"There is no older checkpoint in {ckpt_dir}: start a new run in another directory "
                "(hydra.run.dir=... or trainer.ckpt_dir=...)")
    return (f"The newest older checkpoint is {older[-1]}: to resume from it, write {older[-1]} into "
            f"{ckpt_dir / 'latest'}")


def universal_file_problems(ckpt_dir: Path, tag: str) -> list[str]:
    """The layout-independent state files (``universal/**.safetensors``) whose header does not read
    (a truncated file does not), each named: checked before a resume on another layout."""
    broken = []
    for path in sorted((ckpt_dir / tag / "universal").rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for bad files
            broken.append(f"{path} is truncated or corrupted ({err})")
    if not broken:
        return []
    return [f"cannot resume from {ckpt_dir / tag} on another layout: {'; '.join(broken)}. "
            f"{older_advice(ckpt_dir, tag)}"]


def step_dir_problems(ckpt_dir: Path, tag: str, world_size: int) -> list[str]:
    """The files of a same-layout resume that are missing or cut short, each named (no collective)."""
    step_dir = ckpt_dir / tag
    broken = [f"{path} is truncated (no zip central directory)" for path in sorted(step_dir.rglob("*.pt"))
              if not zipfile.is_zipfile(path)]
    rng_dir = step_dir / "rng"
    for rank in range(world_size):
        path = rng_dir / f"rank_{rank:05d}.json"
        if not rng_dir.is_dir():
            broken.append(f"{rng_dir} is missing (the RNG state of every rank)")
            break
        try:
            json.loads(path.read_text())
        except FileNotFoundError:
            broken.append(f"{path} is missing")
        except ValueError as err:
            broken.append(f"{path} is corrupted ({err})")
    if not broken:
        return []
    return [f"cannot resume from {step_dir}: {'; '.join(broken)}. {older_advice(ckpt_dir, tag)}"]


def save_checkpoint(engine, ckpt_dir: Path, state: TrainerState, *, keep_last: int,
                    universal: dict | None, fault: Fault = NO_FAULT) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``universal``: the
    arguments of :func:`save_universal` (every rank writes its pieces in parallel); None: leave the
    layout-independent state out (``trainer.universal_every``). ``fault``: the run's test-only fault."""
    rank = dist.get_rank()
    tag = tag_for(state.step)
    partial = ckpt_dir / (tag + PARTIAL)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("*" + PARTIAL):
            shutil.rmtree(stale)
    dist.barrier()
    engine.save(ckpt_dir, partial.name)
    failed = None
    try:
        if universal is not None:
            save_universal(engine, partial, **universal)
        _write_json(partial / "rng" / f"rank_{rank:05d}.json", rng_state())
        if rank == 0:
            _write_json(partial / "trainer_state.json", asdict(state))
        fault.in_save(rank, state.step, partial)  # test-only faults (MEGARING_TEST_FAULT): a slow save, a full disk
    except OSError as err:
        failed = err
    agree_files_written(failed, partial)  # every rank's files are complete, or every rank raises
    final = ckpt_dir / tag
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def agree_files_written(failed: OSError | None, partial: Path) -> None:
    """Collective (it is the save's barrier): raise on every rank when any rank failed to write its
    files, so that a full disk on one node stops every rank at once instead of leaving them in the
    next barrier until the collective timeout. The failing rank raises its own error."""
    flag = torch.tensor([0 if failed is None else (failed.errno or errno.EIO)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if failed is not None:
        raise failed
    if flag.item():
        code = int(flag.item())
        raise OSError(code, f"another rank could not write its checkpoint files ({os.strerror(code)})", str(partial))


def load_latest(engine, ckpt_dir: Path) -> TrainerState | None:
    """Restore engine, RNG and trainer state from the checkpoint to resume from; ``None`` when there is none.

    A file the engine cannot read (:func:`step_dir_problems` catches the truncated ones before any
    collective) is a :class:`CheckpointError` naming the checkpoint and the newest older one."""
    found = read_trainer_state(ckpt_dir)
    if found is None:
        return None
    tag, state = found
    try:
        engine.load(ckpt_dir, tag)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot load {ckpt_dir / tag} ({type(err).__name__}: {err}). "
                              f"{older_advice(ckpt_dir, tag)}") from None
    rng_file = ckpt_dir / tag / "rng" / f"rank_{dist.get_rank():05d}.json"
    try:
        set_rng_state(json.loads(rng_file.read_text()))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {rng_file} ({err}). {older_advice(ckpt_dir, tag)}") from None
    return state


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints (never the latest)."""
    latest = read_latest(ckpt_dir)
    for tag in step_tags(ckpt_dir)[:-keep_last]:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag)



def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
