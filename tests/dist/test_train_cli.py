"""``megaring-train`` as users run it: self-spawned workers, torchrun, a dead rank, resume, checkpoints.

Every case is a real command in a subprocess (tiny model, mock data, seq_len 64, 3 steps, gloo).
The uninterrupted self-spawned dp=2 run is made once per module and is the reference of the others:

- a rank killed mid-step ends the job with an error naming it (no hang), and re-running the same
  command resumes from the last checkpoint and logs bit-identical losses and gradient norms;
- the same run under torchrun matches (1e-6 relative: thread counts may differ);
- a save killed before it completes leaves the previous checkpoint as ``latest``;
- ``metrics.jsonl`` and the offline wandb run (config, mesh, group, tags, history) are written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megaring.train.config import experiment_id
from megaring.train.metrics import read_metrics
from tests.helpers.cli import clean_env, losses, ok
from tests.helpers.pool import free_port
from tests.helpers.train_cfg import TINY_RUN, compose_cfg

pytestmark = pytest.mark.slow

COMMON = [o for o in TINY_RUN if not o.startswith(("logging.wandb", "parallel.timeout_s"))] + [
    "parallel.zero_stage=2", "trainer.checkpoint_every=1", "parallel.timeout_s=30",
]
RUN = [*COMMON, "parallel.dp=2"]
SPAWN = ["parallel.nproc_per_node=2"]
KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops", "mfu", "peak_mem_gib", "step_mem_gib",
        "tokens_seen"}


def megaring_train(run_dir: Path, *overrides: str, launcher: tuple[str, ...] = (), run=tuple(RUN),
                   timeout: float = 240, env: dict[str, str] | None = None):
    cmd = [sys.executable, *launcher, "-m", "megaring.train", *run, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, self-spawned, with the offline wandb run."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    ok(megaring_train(run_dir, *SPAWN, "logging.wandb.mode=offline"))
    return run_dir


def test_self_spawn_writes_metrics_and_offline_wandb(reference):
    metrics = read_metrics(reference / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert KEYS <= m.keys() and m["mfu"] is None  # no MFU on CPU
        assert m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens_per_s"] > 0 and m["tflops"] > 0
        assert m["tokens_seen"] == m["step"] * 4 * 64
        assert m["mesh"] == {"dp": 2, "cp": 1, "ulysses": 1, "tp": 1}
    (wandb_file,) = (reference / "wandb").glob("offline-run-*/run-*.wandb")
    raw = wandb_file.read_bytes()
    cfg = compose_cfg(*RUN)
    for needle in (b'"mesh"', b'{"dp":2,"cp":1,"ulysses":1,"tp":1}', b"ulysses1", b"world_size",
                   f"exp-{experiment_id(cfg)}".encode(),
                   b"dp2", b"cp1", b"tp1", b"zero2", b"grad_norm", b"tokens_per_s"):
        assert needle in raw or needle.replace(b'"', b"") in raw, needle
    assert (reference / "checkpoints" / "latest").read_text() == "step_00000003"


def test_dead_rank_ends_the_job_and_the_rerun_resumes_bit_identically(reference, tmp_path):
    killed = megaring_train(tmp_path, *SPAWN, "logging.wandb.mode=offline",
                            env={"MEGARING_TEST_FAULT": "kill:rank=1:step=3"})
    assert killed.returncode != 0
    assert "rank 1 failed" in killed.stderr, killed.stderr[-3000:]
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    wandb_id = (tmp_path / "wandb_run_id").read_text()

    ok(megaring_train(tmp_path, *SPAWN, "logging.wandb.mode=offline"))  # the same command again
    assert losses(tmp_path) == losses(reference)  # bit-identical on CPU
    assert (tmp_path / "wandb_run_id").read_text() == wandb_id  # the same wandb run continues


def test_torchrun_matches_self_spawn(reference, tmp_path):
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}")
    ok(megaring_train(tmp_path, *SPAWN, "logging.wandb.mode=disabled", launcher=launcher))
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(losses(tmp_path), losses(reference), strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-6), step
        assert norm == pytest.approx(ref_norm, rel=1e-6), step


KILL_IN_SECOND_SAVE = """
import os, sys
import megaring.checkpoint.steps as ckpt
write = ckpt._write_json
def dying_write(path, obj):
    if path.name == "trainer_state.json" and "step_00000002" in str(path):
        os._exit(9)  # killed after DeepSpeed's and the RNG files, before the checkpoint is complete
    write(path, obj)
ckpt._write_json = dying_write
from megaring.cli.train import main
sys.argv = ["megaring-train", *sys.argv[1:]]
main()
"""


def test_killed_save_leaves_the_previous_checkpoint_latest(tmp_path):
    args = [*COMMON, "trainer.max_steps=2", "logging.wandb.mode=disabled"]
    cmd = [sys.executable, "-c", KILL_IN_SECOND_SAVE, *args, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 9, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    partial = ckpt / "step_00000002.partial"
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert not (ckpt / "step_00000002").exists()
    assert any(partial.glob("*model_states.pt")) and (partial / "rng" / "rank_00000.json").is_file()
    assert json.loads((ckpt / "step_00000001" / "trainer_state.json").read_text())["step"] == 1

    ok(megaring_train(tmp_path, run=tuple(args)))
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert not partial.exists()
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2]
