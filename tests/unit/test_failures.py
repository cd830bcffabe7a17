"""Single-process tests of the failure handling: bad inputs (one table), guards, run-dir safety, signals.

The table holds bad configs, data, resumes and test hooks as a hostile user would give them; each
row asserts the exception (``ConfigError``: exit status 2 from ``megaring-train``) and that the
message names the offending key or file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from megaring.checkpoint.rundir import RunDirBusy, RunLock, config_change_problems, lr_horizon, result_config
from megaring.checkpoint.steps import TrainerState, tag_for
from megaring.data import write_tokenized
from megaring.ops.faults import ENV, Fault, parse_fault
from megaring.ops.preempt import PreemptWatch
from megaring.train.config_checks import ConfigError, validate
from megaring.train.guards import Diverged, NumericGuard
from megaring.train.metrics import MetricsFile, read_metrics
from megaring.train.step import StepResult
from tests.helpers.train_cfg import TINY_RUN, compose_cfg

# ---------------------------------------------------------------- the table of bad inputs

# (overrides, world size, text the message must hold: the key or file at fault)
BAD_CONFIGS = [
    (["optim.lr=nan"], 1, "optim.lr=nan"),
    (["optim.lr=inf"], 1, "optim.lr=inf"),
    (["optim.lr=-1"], 1, "optim.lr=-1"),
    (["optim.grad_clip=nan"], 1, "optim.grad_clip=nan"),
    (["optim.grad_clip=-1"], 1, "optim.grad_clip=-1"),
    (["optim.eps=nan"], 1, "optim.eps=nan"),
    (["optim.weight_decay=inf"], 1, "optim.weight_decay=inf"),
    (["optim.min_lr_ratio=2"], 1, "optim.min_lr_ratio=2"),
    (["optim.betas=[0.9,1.5]"], 1, "optim.betas"),
    (["optim.betas=[0.9,nan]"], 1, "optim.betas"),
    (["optim.schedule=sawtooth"], 1, "optim.schedule='sawtooth'"),
    (["optim.warmup_steps=-1"], 1, "optim.warmup_steps"),
    (["optim.decay_steps=0"], 1, "optim.decay_steps"),
    (["parallel.timeout_s=nan"], 1, "parallel.timeout_s=nan"),
    (["parallel.timeout_s=0"], 1, "parallel.timeout_s=0"),
    (["parallel.zero_stage=5"], 1, "parallel.zero_stage=5"),
    (["parallel.layout=diagonal"], 1, "parallel.layout='diagonal'"),
    (["parallel.attn_kernel=bogus"], 1, "parallel.attn_kernel='bogus'"),
    (["parallel.ring_backward=lean"], 1, "parallel.ring_backward='lean'"),
    (["parallel.nproc_per_node=many"], 1, "parallel.nproc_per_node='many'"),
    (["parallel.dp=3"], 1, "does not match the world size 1"),
    (["+parallel.deepspeed.train_batch_size=8"], 1, "parallel.deepspeed may not set ['train_batch_size']"),
    (["trainer.seq_len=0"], 1, "trainer.seq_len=0"),
    (["trainer.global_batch_size=0"], 1, "trainer.global_batch_size=0"),
    (["trainer.micro_batch_size=0"], 1, "trainer.micro_batch_size=0"),
    (["trainer.global_batch_size=3", "parallel.dp=2"], 2, "trainer.global_batch_size=3 must be divisible"),
    (["trainer.max_steps=-1"], 1, "trainer.max_steps=-1"),
    (["trainer.checkpoint_every=-1"], 1, "trainer.checkpoint_every=-1"),
    (["trainer.keep_last=0"], 1, "trainer.keep_last=0"),
    (["trainer.log_every=0"], 1, "trainer.log_every=0"),
    (["trainer.dtype=float16"], 1, "trainer.dtype='float16'"),
    (["trainer.preempt_exit_code=300"], 1, "trainer.preempt_exit_code=300"),
    (["trainer.preempt_grace_s=0"], 1, "trainer.preempt_grace_s=0"),
    (["trainer.preempt_grace_s=nan"], 1, "trainer.preempt_grace_s=nan"),
    (["trainer.max_bad_steps=-1"], 1, "trainer.max_bad_steps=-1"),
    (["trainer.loss_spike_factor=-1"], 1, "trainer.loss_spike_factor=-1"),
    (["trainer.loss_spike_factor=inf"], 1, "trainer.loss_spike_factor=inf"),
    (["trainer.resume_allow_changes=[optim.speed]"], 1, "trainer.resume_allow_changes names ['optim.speed']"),
    (["eval.every=-1"], 1, "eval.every=-1"),
    (["eval.every=5"], 1, "eval.every=5 needs validation data"),
    (["logging.wandb.mode=loud"], 1, "logging.wandb.mode='loud'"),
    (["data.valid_fraction=1.5"], 1, "valid_fraction"),
    (["data.kind=files"], 1, "data.path"),
    (["data.vocab_size=1024"], 1, "model.vocab_size=256"),
    (["model.n_heads=7"], 1, "model.n_heads"),
    (["parallel.cp=2", "trainer.seq_len=66"], 2, "sequence length 66 is not divisible by 2*cp=4"),
]


@pytest.mark.parametrize("overrides,world_size,named", BAD_CONFIGS, ids=[" ".join(r[0]) for r in BAD_CONFIGS])
def test_bad_config_is_a_config_error_naming_the_key(overrides, world_size, named):
    cfg = compose_cfg(*TINY_RUN, *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size)
    assert named in str(err.value), str(err.value)


def write_checkpoint(ckpt_dir: Path, step: int, **fields) -> None:
    (ckpt_dir / tag_for(step)).mkdir(parents=True)
    state = TrainerState(step, 4 * step, 256 * step, {"dp": 1, "cp": 1, "tp": 1, "zero_stage": 1}, **fields)
    (ckpt_dir / tag_for(step) / "trainer_state.json").write_text(json.dumps(state.__dict__))
    (ckpt_dir / "latest").write_text(tag_for(step))


def bad_store(tmp_path: Path, damage: str) -> Path:
    store = tmp_path / "store"
    write_tokenized(store, [np.arange(50) % 255, np.arange(70) % 255], vocab_size=256, eod_id=255)
    if damage == "truncated":
        tokens = store / "tokens.bin"
        tokens.write_bytes(tokens.read_bytes()[:-10])
    elif damage == "empty_dir":
        for f in store.iterdir():
            f.unlink()
    elif damage == "metadata":
        (store / "metadata.json").write_text("{not json")
    elif damage == "too_small":
        shutil.rmtree(store)
        write_tokenized(store, [np.arange(30) % 255], vocab_size=256, eod_id=255)
    return store


@pytest.mark.parametrize("damage,named", [("truncated", "tokens.bin"), ("empty_dir", "store"),
                                          ("metadata", "metadata.json"), ("too_small", "holds 30 tokens")])
def test_bad_data_store_is_a_config_error_naming_the_file(tmp_path, damage, named):
    cfg = compose_cfg(*TINY_RUN, "data=files", f"data.path={bad_store(tmp_path, damage)}")
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert named in str(err.value), str(err.value)


RESUMES = [  # (what the checkpoint directory holds, overrides, text the message must hold)
    ("history", ["trainer.resume=false"], "trainer.resume=false, but"),
    ("changed", ["optim.lr=0.02"], "optim.lr=0.02 (checkpoint: 0.01)"),
    ("changed", ["trainer.seed=7"], "trainer.seed=7 (checkpoint: 1234)"),
    ("changed", ["trainer.seq_len=128"], "trainer.resume_allow_changes=[trainer.seq_len]"),
    ("corrupt", [], "trainer_state.json is corrupted"),
    ("missing", [], "names a checkpoint without trainer_state.json"),
]


@pytest.mark.parametrize("holds,overrides,named", RESUMES, ids=[f"{r[0]}-{' '.join(r[1])}" for r in RESUMES])
def test_bad_resume_is_a_config_error_naming_the_key_or_file(tmp_path, holds, overrides, named):
    ckpt = tmp_path / "checkpoints"
    write_checkpoint(ckpt, 3, config=result_config(compose_cfg(*TINY_RUN)))
    if holds == "corrupt":
        (ckpt / tag_for(3) / "trainer_state.json").write_text('{"step": 3, "consumed')
    elif holds == "missing":
        (ckpt / tag_for(3) / "trainer_state.json").unlink()
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*TINY_RUN, *overrides), 1, ckpt)
    assert named in str(err.value), str(err.value)


def test_allowed_changes_and_run_neutral_keys_resume(tmp_path):
    saved = result_config(compose_cfg(*TINY_RUN))
    ok = compose_cfg(*TINY_RUN, "optim.lr=0.02", "trainer.resume_allow_changes=[optim.lr]", "trainer.max_steps=9",
                     "trainer.max_bad_steps=1", "data.verify_checksum=true")
    assert config_change_problems(ok, saved, tmp_path) == []


def test_bad_test_fault_spec_names_the_variable():
    with pytest.raises(ValueError, match="MEGARING_TEST_FAULT='explode:rank=1'"):
        parse_fault("explode:rank=1")
    assert parse_fault("nan:rank=1:step=2:until=3") == ("nan", {"rank": 1, "step": 2, "until": 3})


def test_a_fault_is_parsed_once_and_fires_only_on_its_rank_steps_and_hook(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, "enospc:rank=1:step=2")
    fault = Fault.from_env()
    monkeypatch.setenv(ENV, "bogus")  # read once: a later change of the environment is not parsed again
    fault.at_step(1, 2)  # a save fault does nothing at the step's start
    fault.in_save(0, 2, tmp_path)  # another rank
    fault.in_save(1, 3, tmp_path)  # another step
    with pytest.raises(OSError, match="No space left"):
        fault.in_save(1, 2, tmp_path)
    monkeypatch.delenv(ENV)
    assert Fault.from_env() == Fault() and Fault().ring_drop() is None
    assert Fault(*parse_fault("ringdrop:rank=1:call=3")).ring_drop() == (1, 3)


# ---------------------------------------------------------------- numerical guards and metrics


def result(loss: float, norm: float | None = 1.0, applied: bool = True) -> StepResult:
    return StepResult(loss, norm, 1e-3, 256, applied)


def test_guard_skips_up_to_max_bad_steps_then_names_the_step():
    guard = NumericGuard(max_bad_steps=2, spike_factor=0)
    assert guard.check(1, result(5.0)) == ({}, None)
    fields, note = guard.check(2, result(5.0, math.inf, applied=False))
    assert fields == {"skipped": True, "bad_steps": 1} and "step 2: non-finite gradient norm inf" in note
    guard.check(3, result(math.nan, math.nan, applied=False))
    with pytest.raises(Diverged, match=r"step 4: non-finite loss nan and gradient norm nan; 3 bad steps in a row "
                                       r"exceed trainer.max_bad_steps=2"):
        guard.check(4, result(math.nan, math.nan, applied=False))
    guard = NumericGuard(max_bad_steps=1, spike_factor=0)
    guard.check(1, result(5.0, math.nan, applied=False))
    guard.check(2, result(5.0))  # a good step resets the count
    guard.check(3, result(5.0, math.nan, applied=False))


def test_loss_spike_against_the_running_median():
    guard = NumericGuard(max_bad_steps=0, spike_factor=3.0, min_history=4)
    for step, loss in enumerate([4.0, 4.2, 3.9, 4.1], start=1):
        assert guard.check(step, result(loss)) == ({}, None)
    fields, note = guard.check(5, result(20.0))
    assert fields["loss_spike"]["median"] == pytest.approx(4.05) and "loss spike" in note
    assert guard.check(6, result(5.0)) == ({}, None)


def test_metrics_file_is_standard_json_with_nonfinite_flags(tmp_path):
    f = MetricsFile(tmp_path / "metrics.jsonl")
    f.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "loss_spike": {"ratio": -math.inf}})
    f.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["loss"] is None and record["loss_nonfinite"] == "nan" and record["grad_norm_nonfinite"] == "inf"
    assert record["loss_spike"] == {"ratio": None, "ratio_nonfinite": "-inf"} and record["lr"] == 1e-3


# ---------------------------------------------------------------- run directory, schedule, signals


def test_run_lock_names_the_holder_and_is_released(tmp_path):
    held = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirBusy, match=rf"run directory {tmp_path} is in use by another run \(pid {os.getpid()} on"):
        RunLock(tmp_path).acquire()
    held.release()
    RunLock(tmp_path).acquire().release()


def test_lr_horizon_is_kept_on_resume_unless_set_explicitly():
    cfg = compose_cfg(*TINY_RUN, "trainer.max_steps=80")
    assert lr_horizon(cfg, None) == (80, None)
    saved = TrainerState(50, 0, 0, {}, lr_horizon=50)
    assert lr_horizon(cfg, saved) == (50, None)  # extending the run keeps the schedule it started with
    horizon, note = lr_horizon(compose_cfg(*TINY_RUN, "optim.decay_steps=100"), saved)
    assert horizon == 100 and "changed from 50 steps (checkpoint) to 100" in note


def test_preempt_watch_notes_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    watch = PreemptWatch(grace_s=60).install()
    try:
        assert watch.agreed_stop(device="cpu") is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.signal_name == "SIGUSR1" and watch.timer is not None
        assert watch.agreed_stop(device="cpu") == signal.SIGUSR1 and watch.timer is None  # grace ends at the boundary
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_after_the_save_the_signal_goes_on_to_its_previous_handler():
    """Under submitit the previous handler of its preemption signal requeues the job; Ctrl-C's
    KeyboardInterrupt and default actions are not repeated."""
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        watch = PreemptWatch(grace_s=60).install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.agreed_stop(device="cpu") == signal.SIGUSR1 and seen == []
        watch.hand_on()
        watch.uninstall()
        assert seen == [signal.SIGUSR1]
        watch = PreemptWatch(grace_s=60).install()  # SIGINT's previous handler raises KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)
        watch.agreed_stop(device="cpu")
        watch.hand_on()
        watch.uninstall()
    finally:
        signal.signal(signal.SIGUSR1, before)


# ---------------------------------------------------------------- data integrity


def overwritten_store(tmp_path: Path) -> Path:
    """A store whose tokens.bin got out-of-vocabulary ids after preprocessing (every 50th uint16 = 60000)."""
    store = tmp_path / "store"
    write_tokenized(store, [np.arange(300) % 255, np.arange(400) % 255], vocab_size=256, eod_id=255)
    tokens = np.fromfile(store / "tokens.bin", dtype="<u2")
    tokens[49::50] = 60000
    tokens.tofile(store / "tokens.bin")
    return store


def test_out_of_vocabulary_ids_fail_the_sample_read_naming_the_store(tmp_path):
    from megaring.data import BatchShape, DataConfig, RankShard, build_batch_reader
    from megaring.data.store import StoreError

    store = overwritten_store(tmp_path)
    reader = build_batch_reader(DataConfig(kind="files", path=str(store)), BatchShape(64, 4, 1),
                                RankShard(0, 1, 0, 1, "zigzag"), seed=0)
    with pytest.raises(StoreError, match=rf"{store}: sample \d+ .* holds token id 60000, outside the vocabulary"):
        reader.micro_batches(0)


def test_preprocess_verify_names_the_first_bad_byte_range(tmp_path, capsys):
    from megaring.data.preprocess import verify_main

    good = tmp_path / "good"
    write_tokenized(good, [np.arange(300) % 255], vocab_size=256, eod_id=255)
    assert verify_main(str(good)) == 0 and "ok (1 documents" in capsys.readouterr().out
    store = overwritten_store(tmp_path)
    assert verify_main(str(store)) == 1
    err = capsys.readouterr().err
    assert f"{store / 'tokens.bin'} is corrupted: bytes [0, 1048576) differ" in err, err
    (store / "tokens.blocks.json").unlink()  # a store from before block checksums: the whole-file checksum
    assert verify_main(str(store)) == 1 and "is corrupted: checksum" in capsys.readouterr().err


def test_no_wandb_run_when_there_is_nothing_to_log(tmp_path):
    """A finished run re-run trains nothing: no wandb run, so no empty offline-run-* directory each time."""
    from megaring.train.tracking import Tracker

    cfg = compose_cfg(*TINY_RUN, "logging.wandb.mode=offline")
    tracker = Tracker(cfg, tmp_path, rank=0, world_size=1, active=False)
    tracker.log({"step": 1, "loss": 1.0})
    tracker.finish()
    assert tracker.run is None and not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()


def test_spawned_worker_exit_keeps_its_output_and_skips_the_teardown(tmp_path):
    """exit_now: the status and the buffered output survive; atexit (the interpreter's teardown) never runs."""
    import subprocess
    import sys

    marker = tmp_path / "teardown-ran"
    script = ("import atexit, logging, sys, pathlib\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).touch)\n"
              "from megaring.ops.spawn import exit_now\n"
              "print('printed, still buffered', end='')\n"
              "print('on stderr', end='', file=sys.stderr)\n"
              "exit_now(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert done.returncode == 3, done.stderr
    assert done.stdout == "printed, still buffered"
    assert done.stderr.endswith("on stderr")
    assert not marker.exists()
