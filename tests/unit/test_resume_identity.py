"""Resume identity, on fake checkpoint directories (no DeepSpeed run): which checkpoint a run resumes
from when ``latest`` is gone, the checkpoint directory's lock, the token store's identity, and the
checks that name a damaged checkpoint file before any collective.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from megaring.checkpoint.rundir import RunDirBusy, RunLock, RunLocks, data_identity_problems, write_problem
from megaring.checkpoint.steps import (
    CheckpointError,
    TrainerState,
    find_latest,
    load_latest,
    prune,
    read_trainer_state,
    tag_for,
)
from megaring.cli.train import run_dir_problem
from megaring.data import store_identity, write_tokenized
from megaring.train.config_checks import ConfigError, validate
from tests.helpers.train_cfg import TINY_RUN, compose_cfg
from tests.unit.test_failures import write_checkpoint

LAYOUT_1 = {"dp": 1, "cp": 1, "tp": 1, "zero_stage": 1}


def whole_checkpoint(ckpt_dir: Path, step: int, cfg=None, **fields) -> Path:
    """A fake checkpoint that passes the file checks: one engine zip archive and rank 0's RNG file."""
    write_checkpoint(ckpt_dir, step, **fields)
    step_dir = ckpt_dir / tag_for(step)
    torch.save({"w": torch.zeros(64)}, step_dir / "mp_rank_00_model_states.pt")
    (step_dir / "rng").mkdir()
    (step_dir / "rng" / "rank_00000.json").write_text("{}")
    return step_dir


def problems(cfg, ckpt_dir: Path, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size, ckpt_dir)
    return str(err.value)


# ---------------------------------------------------------------- latest recovery


def test_a_deleted_latest_resumes_from_the_newest_complete_step_and_says_so(tmp_path):
    for step in (2, 4):
        write_checkpoint(tmp_path, step)
    (tmp_path / (tag_for(6) + ".partial")).mkdir()  # a killed save: never a checkpoint
    (tmp_path / "latest").unlink()
    tag, state = read_trainer_state(tmp_path)
    assert (tag, state.step) == (tag_for(4), 4)
    assert find_latest(tmp_path).note == f"{tmp_path / 'latest'} is missing: resuming from the newest complete " \
                                         f"checkpoint, {tag_for(4)}"
    prune(tmp_path, keep_last=1)  # the one resumed from is never pruned
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(4), tag_for(6) + ".partial"]


def test_a_deleted_latest_is_history_that_resume_false_refuses(tmp_path):
    write_checkpoint(tmp_path, 3)
    (tmp_path / "latest").unlink()
    message = problems(compose_cfg(*TINY_RUN, "trainer.resume=false"), tmp_path)
    assert f"trainer.resume=false, but {tmp_path} holds checkpoints of an earlier run (latest: step 3)" in message


def test_latest_naming_a_removed_checkpoint_names_the_ones_there(tmp_path):
    write_checkpoint(tmp_path, 2)
    (tmp_path / "latest").write_text(tag_for(5))
    message = problems(compose_cfg(*TINY_RUN), tmp_path)
    assert f"{tmp_path / 'latest'} names 'step_00000005', which is not a checkpoint" in message, message
    assert f"write the tag of one that is into it ({tag_for(2)})" in message, message


# ---------------------------------------------------------------- locks and writable directories


def test_a_shared_checkpoint_directory_is_refused_naming_the_holder(tmp_path):
    ckpt = tmp_path / "shared"
    first = RunLocks(tmp_path / "run_a", ckpt).acquire()
    with pytest.raises(RunDirBusy) as err:
        RunLocks(tmp_path / "run_b", ckpt).acquire()
    assert f"checkpoint directory {ckpt} is in use by another run (pid {os.getpid()} on" in str(err.value)
    assert f"run directory {tmp_path / 'run_a'};" in str(err.value) and "trainer.ckpt_dir" in str(err.value)
    RunLock(tmp_path / "run_b").acquire().release()  # the refused run let go of its own run directory
    first.release()
    RunLocks(tmp_path / "run_b", ckpt).acquire().release()


def test_a_run_directory_used_as_another_runs_checkpoint_directory_is_refused(tmp_path):
    first = RunLocks(tmp_path / "run_a", tmp_path / "run_a" / "checkpoints").acquire()
    with pytest.raises(RunDirBusy, match=f"checkpoint directory {tmp_path / 'run_a'} is in use"):
        RunLocks(tmp_path / "run_b", tmp_path / "run_a").acquire()
    first.release()


def test_a_checkpoint_directory_that_cannot_be_written_is_refused_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as err:
        RunLocks(tmp_path / "run", blocker / "checkpoints").acquire()
    assert f"the checkpoint directory {blocker / 'checkpoints'} cannot be written ({blocker} is a file, not a " \
           "directory): make it writable, or choose another trainer.ckpt_dir" == str(err.value)
    RunLock(tmp_path / "run").acquire().release()


def test_a_read_only_directory_is_found_by_the_write_probe(tmp_path, monkeypatch):
    """As root (the tests) permissions do not stop a write; a read-only mount raises EROFS like this."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert write_problem(tmp_path, "checkpoint directory", "trainer.ckpt_dir") == (
        f"the checkpoint directory {tmp_path} cannot be written (Read-only file system): make it writable, or "
        "choose another trainer.ckpt_dir")
    with pytest.raises(ConfigError, match="Read-only file system"):
        RunLocks(tmp_path / "run", tmp_path / "ckpt").acquire()


# ---------------------------------------------------------------- the token store's identity


def store(path: Path, seed: int, vocab_size: int = 256) -> Path:
    rng = np.random.default_rng(seed)
    write_tokenized(path, [rng.integers(0, vocab_size - 1, 300) for _ in range(3)], vocab_size=vocab_size,
                    eod_id=vocab_size - 1)
    return path


def test_resuming_on_a_replaced_token_store_names_both(tmp_path):
    data = store(tmp_path / "store", seed=0)
    cfg = compose_cfg(*TINY_RUN, "data=files", f"data.path={data}")
    trained_on = store_identity(cfg.data)
    whole_checkpoint(tmp_path / "ckpt", 3, config=None, data=trained_on)
    validate(cfg, 1, tmp_path / "ckpt")  # the same store resumes

    os.rename(data, tmp_path / "old_store")
    store(data, seed=1, vocab_size=250)  # another store at the same path
    message = problems(cfg, tmp_path / "ckpt")
    now = store_identity(cfg.data)
    assert f"resuming {tmp_path / 'ckpt' / tag_for(3)} on another token store: data.path={data} holds" in message
    assert f"tokens_crc32 {now['tokens_crc32']!r} (checkpoint: {trained_on['tokens_crc32']!r})" in message
    assert "vocab_size 250 (checkpoint: 256)" in message and "trainer.resume_allow_changes=[data.store]" in message
    allowed = compose_cfg(*TINY_RUN, "data=files", f"data.path={data}", "trainer.resume_allow_changes=[data.store]")
    assert data_identity_problems(allowed, now, trained_on, tmp_path) == []
    validate(allowed, 1, tmp_path / "ckpt")


def test_the_trainer_state_records_the_store_identity(tmp_path):
    identity = store_identity(compose_cfg(*TINY_RUN, "data=files", f"data.path={store(tmp_path / 's', 0)}").data)
    state = TrainerState(1, 4, 256, LAYOUT_1, data=identity)
    assert TrainerState(**json.loads(json.dumps(state.__dict__))) == state
    assert {"tokens", "documents", "tokens_crc32", "tokenizer_sha256", "vocab_size"} <= set(identity)
    assert store_identity(compose_cfg(*TINY_RUN).data) is None  # mock: its data.* keys are compared as config


# ---------------------------------------------------------------- damaged checkpoint files


def test_a_truncated_engine_file_is_named_with_the_newest_older_checkpoint(tmp_path):
    whole_checkpoint(tmp_path, 2)
    step_dir = whole_checkpoint(tmp_path, 4)
    engine_file = step_dir / "mp_rank_00_model_states.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:100])
    message = problems(compose_cfg(*TINY_RUN), tmp_path)
    assert f"cannot resume from {step_dir}: {engine_file} is truncated (no zip central directory)" in message
    assert f"The newest older checkpoint is {tag_for(2)}: to resume from it, write {tag_for(2)} into " \
           f"{tmp_path / 'latest'}" in message, message
    (tmp_path / "latest").write_text(tag_for(2))  # that advice works
    validate(compose_cfg(*TINY_RUN), 1, tmp_path)


def test_a_missing_rng_directory_or_rank_file_is_named(tmp_path):
    step_dir = whole_checkpoint(tmp_path, 2)
    dp2 = compose_cfg(*TINY_RUN, "parallel.dp=2")
    state = json.loads((step_dir / "trainer_state.json").read_text()) | {"layout": dp2.parallel.layout_key()}
    (step_dir / "trainer_state.json").write_text(json.dumps(state))  # written at dp=2: rank 1's file is needed
    message = problems(dp2, tmp_path, 2)
    assert f"{step_dir / 'rng' / 'rank_00001.json'} is missing" in message, message
    for f in (step_dir / "rng").iterdir():
        f.unlink()
    (step_dir / "rng").rmdir()
    message = problems(dp2, tmp_path, 2)
    assert f"{step_dir / 'rng'} is missing (the RNG state of every rank)" in message, message
    assert f"There is no older checkpoint in {tmp_path}: start a new run in another directory" in message


def test_a_truncated_layout_independent_file_is_named_on_another_layout(tmp_path):
    step_dir = whole_checkpoint(tmp_path, 2)
    (step_dir / "universal").mkdir()
    state_file = step_dir / "universal" / "state-00001.safetensors"
    save_file({"param.w": torch.zeros(256)}, str(state_file))
    state_file.write_bytes(state_file.read_bytes()[:-100])
    message = problems(compose_cfg(*TINY_RUN, "parallel.dp=2"), tmp_path, 2)
    assert f"cannot resume from {step_dir} on another layout: {state_file} is truncated or corrupted" in message


def test_a_model_shape_change_advises_a_new_run_not_resume_false(tmp_path):
    step_dir = whole_checkpoint(tmp_path, 2)
    saved = compose_cfg(*TINY_RUN)
    (step_dir / "universal").mkdir()
    (step_dir / "universal" / "meta.json").write_text(json.dumps(
        {"format": 1, "model": asdict(saved.model), "weight_map": {}}))
    message = problems(compose_cfg(*TINY_RUN, "model.n_layers=3"), tmp_path)
    assert "model.n_layers=3 differs from the checkpoint" in message, message
    assert "start a new run in another directory (hydra.run.dir=... or trainer.ckpt_dir=...)" in message
    assert "trainer.resume=false" not in message


def test_an_engine_file_that_fails_inside_the_load_is_named_with_the_older_checkpoint(tmp_path):
    class TruncatedEngine:
        def load(self, directory, tag):
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    whole_checkpoint(tmp_path, 2)
    whole_checkpoint(tmp_path, 4)
    with pytest.raises(CheckpointError) as err:
        load_latest(TruncatedEngine(), tmp_path)
    assert str(err.value) == (f"cannot load {tmp_path / tag_for(4)} (RuntimeError: PytorchStreamReader failed reading "
                              f"zip archive: failed finding central directory). The newest older checkpoint is "
                              f"{tag_for(2)}: to resume from it, write {tag_for(2)} into {tmp_path / 'latest'}")


def test_a_run_directory_through_a_file_is_refused_before_hydra_creates_it(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("")
    assert run_dir_problem(blocker) == (f"hydra.run.dir={blocker} names a file, not a directory: choose a directory "
                                        "(a new one starts a new run)")
    assert run_dir_problem(blocker / "run") == (f"the run directory {blocker / 'run'} cannot be written ({blocker} is "
                                                "a file, not a directory): make it writable, or choose another "
                                                "hydra.run.dir")
    assert run_dir_problem(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()
