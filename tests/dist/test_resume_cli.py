"""``megaring-train`` resume identity, as a user meets it (real commands in subprocesses).

- a second run refused by a live run's locks (its run directory, or its checkpoint directory named
  as ``trainer.ckpt_dir`` by a run elsewhere) writes nothing there: the live run's ``.hydra/`` files
  stay as they were; a ``hydra.run.dir`` naming a file is one line and exit 2 (no training: the
  test process holds the locks as the live run would);
- one real run on a token store (single process, tiny model, 2 steps): its checkpoints record the
  store's identity; with ``latest`` deleted the same command resumes from the newest step and says
  so; a truncated engine file, then a replaced store, are refused with exit 2 naming the file / both
  stores, before any training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megaring.data import store_identity, write_tokenized
from megaring.checkpoint.rundir import RunLocks
from megaring.train.trainer import checkpoint_dir
from tests.helpers.cli import clean_env, losses, ok
from tests.helpers.train_cfg import TINY_RUN, compose_cfg

pytestmark = pytest.mark.slow

RUN = [o for o in TINY_RUN if not o.startswith("trainer.max_steps")] + ["trainer.checkpoint_every=1",
                                                                         "trainer.keep_last=4"]


def megaring_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megaring.train", *RUN, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)


def refused(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_refused_runs_write_nothing_into_the_live_runs_directories(tmp_path):
    live, other = tmp_path / "live", tmp_path / "other"
    record = live / ".hydra"
    record.mkdir(parents=True)
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        (record / name).write_text(f"the live run's {name}\n")
    locks = RunLocks(live, live / "checkpoints").acquire()  # as the live run's rank 0 holds them
    try:
        refused(megaring_train(live, "trainer.max_steps=3"), f"run directory {live} is in use by another run (pid ")
        spawned = megaring_train(other, "trainer.max_steps=3", f"trainer.ckpt_dir={live / 'checkpoints'}",
                                 "parallel.nproc_per_node=2", "parallel.dp=2")
        refused(spawned, f"checkpoint directory {live / 'checkpoints'} is in use by another run (pid ")
        assert f"run directory {live};" in spawned.stderr, spawned.stderr[-2000:]
    finally:
        locks.release()
    assert {p.name: p.read_text() for p in record.iterdir()} == {
        n: f"the live run's {n}\n" for n in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    assert not (other / ".hydra").exists()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a run directory")
    refused(megaring_train(blocker, "trainer.max_steps=3"), f"hydra.run.dir={blocker} names a file, not a directory")


def token_store(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    write_tokenized(path, [rng.integers(0, 255, 100) for _ in range(30)], vocab_size=256, eod_id=255)
    return path


def test_resume_recovers_a_deleted_latest_and_refuses_broken_files_and_another_store(tmp_path):
    data = token_store(tmp_path / "store", seed=0)
    run_dir, files = tmp_path / "run", ("data=files", f"data.path={data}")
    ok(megaring_train(run_dir, *files, "trainer.max_steps=2"))
    ckpt = checkpoint_dir(compose_cfg(*RUN, *files), run_dir)
    assert json.loads((ckpt / "step_00000002" / "trainer_state.json").read_text())["data"] == \
        store_identity(compose_cfg(*RUN, *files).data)
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # written by rank 0 once it held the locks
    first = losses(run_dir)

    (ckpt / "latest").unlink()
    resumed = megaring_train(run_dir, *files, "trainer.max_steps=3")
    ok(resumed)
    assert (f"{ckpt / 'latest'} is missing: resuming from the newest complete checkpoint, step_00000002"
            in resumed.stdout + resumed.stderr), resumed.stderr[-3000:]
    assert losses(run_dir)[:2] == first and [s for s, _, _ in losses(run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000001", "step_00000002", "step_00000003"]

    engine_file = next((ckpt / "step_00000003").glob("*optim_states.pt"))
    whole = engine_file.read_bytes()
    engine_file.write_bytes(whole[: len(whole) // 2])
    refused(megaring_train(run_dir, *files, "trainer.max_steps=4"),
            f"{engine_file} is truncated (no zip central directory). The newest older checkpoint is step_00000002: "
            f"to resume from it, write step_00000002 into {ckpt / 'latest'}")
    engine_file.write_bytes(whole)

    data.rename(tmp_path / "store_trained_on")
    token_store(data, seed=1)  # another store in its place
    replaced = megaring_train(run_dir, *files, "trainer.max_steps=4")
    refused(replaced, f"resuming {ckpt / 'step_00000003'} on another token store: data.path={data} holds tokens_crc32")
    assert "trainer.resume_allow_changes=[data.store]" in replaced.stderr
    assert [s for s, _, _ in losses(run_dir)] == [1, 2, 3]  # the refused runs changed nothing
