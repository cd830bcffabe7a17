"""``megaring-train`` under failure, as an operator meets it: preemption, non-finite steps, a busy run dir.

Real commands in subprocesses (tiny model, mock data, seq_len 64, cp=2 self-spawned on two gloo
workers, ZeRO-2). The uninterrupted 4-step run is made once per module and is the reference:

- SIGTERM to the spawner while a rank is inside step 2 (a test-only sleep holds it there): every
  rank stops after step 2, the checkpoint is step 2, exit status 0; re-running the same command
  resumes and logs losses and gradient norms bit-identical to the reference;
- a NaN gradient on rank 1 in steps 2 and 3: step 2 is skipped on every rank (the weights of the
  step-2 checkpoint are the step-1 ones), ``metrics.jsonl`` stays standard JSON, and step 3 exceeds
  ``trainer.max_bad_steps=1``: exit 3 naming the step;
- a second run in a run directory that a live run holds fails with exit 2 naming the holder, and
  SIGTERM without a step boundary within ``trainer.preempt_grace_s`` exits 143 without a checkpoint;
- ``launch/slurm.sbatch`` with a stand-in srun / scontrol: slurm's USR1 warning saves and requeues;
- SIGTERM to ``launch/torchrun.sh`` during a (slowed, test-hook) checkpoint save: the save completes,
  the run stops there with exit 0, and the same command resumes bit-identically;
- a second SIGTERM during the preemption save: exit 143 at once, ``latest`` stays the previous
  complete checkpoint and the resume from it is bit-identical;
- a full disk (a test hook's ENOSPC) on one rank during a save: every rank stops, exit 2, the message
  names ENOSPC and the directory, ``latest`` stays the previous checkpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaring.checkpoint.universal import UniversalState
from tests.helpers.cli import ROOT, clean_env, losses, ok
from tests.helpers.pool import free_port
from tests.helpers.train_cfg import TINY_RUN

pytestmark = pytest.mark.slow

RUN = [o for o in TINY_RUN if not o.startswith(("parallel.timeout_s", "trainer.max_steps"))] + [
    "parallel.timeout_s=30", "parallel.cp=2", "parallel.nproc_per_node=2", "parallel.zero_stage=2",
    "trainer.max_steps=4",
]


# A rank that is late for a step (MEGARING_TEST_FAULT=sleep) says so as its sleep begins; a signal sent
# then reaches the workers well within LATE_S, inside that step.
FAULT_LINE = "MEGARING_TEST_FAULT: sleep on rank {rank} at step {step}"
LATE_S = 4


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megaring.train", *RUN, *overrides, f"hydra.run.dir={run_dir}"]


def megaring_train(run_dir: Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(command(run_dir, *overrides), env=clean_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240, text: str | None = None) -> None:
    """Until ``path`` exists (and reads ``text``, when given) while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (text is None or path.read_text() == text):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def started(cmd: list[str], env: dict[str, str], out_dir: Path, **kwargs) -> subprocess.Popen:
    """``cmd`` running, its stdout and stderr written to ``out_dir/stdout.txt`` and ``stderr.txt``
    (readable while it runs: :func:`wait_for_text`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "stdout.txt", "w") as out, open(out_dir / "stderr.txt", "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, **kwargs)


def output(out_dir: Path) -> tuple[str, str]:
    """The stdout and stderr of a :func:`started` command."""
    return (out_dir / "stdout.txt").read_text(errors="replace"), (out_dir / "stderr.txt").read_text(errors="replace")


def wait_for_text(out_dir: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the stdout or stderr of a :func:`started` command holds ``text``, while it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in o for o in output(out_dir)):
            return
        assert proc.poll() is None, output(out_dir)[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{text!r} was never printed")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    ok(megaring_train(run_dir))
    return run_dir


def test_sigterm_saves_at_the_agreed_step_and_the_rerun_is_bit_identical(reference, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    env = clean_env(MEGARING_TEST_FAULT=f"sleep:rank=1:step=2:seconds={LATE_S}")  # rank 1 is late for step 2
    proc = started(command(run_dir), env, logs)
    wait_for_text(logs, FAULT_LINE.format(rank=1, step=2), proc)  # rank 1 asleep, rank 0 waiting for it
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=240)
    _, stderr = output(logs)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM received" in stderr and "stopped after step 2" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert [s for s, _, _ in losses(run_dir)] == [1, 2]

    ok(megaring_train(run_dir))  # the same command again (a requeued job)
    assert losses(run_dir) == losses(reference)  # bit-identical on CPU


def test_nan_gradient_on_one_rank_skips_the_step_then_stops_past_max_bad_steps(tmp_path):
    proc = megaring_train(tmp_path, "trainer.max_bad_steps=1", "trainer.checkpoint_every=1", "trainer.keep_last=4",
                          env={"MEGARING_TEST_FAULT": "nan:rank=1:step=2:until=3"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 3: non-finite gradient norm" in proc.stderr and "trainer.max_bad_steps=1" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # standard JSON: no NaN / Infinity tokens
    assert "NaN" not in "".join(lines) and "Infinity" not in "".join(lines)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["skipped"] is True and records[1]["grad_norm"] is None
    assert records[1]["grad_norm_nonfinite"] in ("nan", "inf")
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"  # no checkpoint of the stopped step

    def weights(tag: str) -> dict:
        state = UniversalState(ckpt / tag)  # every rank's pieces, joined
        return {name: state.tensor("param", name) for name in state.names()}

    before, after = weights("step_00000001"), weights("step_00000002")
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing


def test_a_held_run_directory_is_refused_and_a_late_step_boundary_exits_without_a_checkpoint(tmp_path):
    """The first run holds its directory while rank 0 sleeps in step 1; a second run there fails naming
    it. SIGTERM then finds no step boundary within trainer.preempt_grace_s: exit 128 + 15, no checkpoint."""
    env = clean_env(MEGARING_TEST_FAULT="sleep:rank=0:step=1:seconds=60")
    # parallel.timeout_s above the sleep: rank 1 waits on rank 0 meanwhile, and on a busy machine the
    # second run can take longer than RUN's 30 s to be refused (the first then ended with a hang report).
    first = subprocess.Popen(command(tmp_path, "trainer.preempt_grace_s=2", "parallel.timeout_s=120"), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "megaring.lock"
        deadline = time.monotonic() + 240
        while not (lock.is_file() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = megaring_train(tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"run directory {tmp_path} is in use by another run (pid " in second.stderr, second.stderr[-2000:]
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert "no step boundary within 2 s: exiting without a new checkpoint" in stderr, stderr[-3000:]
        assert not (tmp_path / "checkpoints" / "latest").exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()


FAKE_SRUN = """#!/usr/bin/env bash
# slurm's srun on one machine: $SLURM_NTASKS tasks; TERM is forwarded to every task, as srun does.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
  while :; do wait "$pid" && r=0 || r=$?; kill -0 "$pid" 2>/dev/null || break; done
  [[ $r -ne 0 ]] && rc=$r
done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1" == show ]]; then echo localhost; else echo "$@" >> "$SCONTROL_LOG"; fi
"""


@pytest.mark.parametrize("mode", ["task", "torchrun"])
def test_slurm_time_limit_warning_saves_and_requeues(mode, reference, tmp_path):
    """``launch/slurm.sbatch`` (task mode: two tasks; torchrun mode: one task running launch/torchrun.sh
    for two workers) gets slurm's USR1 warning while rank 1 is inside step 2: the job step saves at
    step 2 and exits 0, the script requeues the job, and the requeued run resumes (task mode)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    run_dir, log = tmp_path / "run", tmp_path / "scontrol.log"
    env = clean_env(PATH=f"{fake_bin}:{clean_env()['PATH']}", MODE=mode, PYTHON=sys.executable,
                    SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_NTASKS="2" if mode == "task" else "1",
                    GPUS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()),
                    SCONTROL_LOG=str(log))
    script = ["bash", str(ROOT / "launch" / "slurm.sbatch"), *RUN, f"hydra.run.dir={run_dir}"]
    job_out = tmp_path / "job"
    job = started(script, env | {"MEGARING_TEST_FAULT": f"sleep:rank=1:step=2:seconds={LATE_S}"}, job_out, cwd=ROOT)
    wait_for_text(job_out, FAULT_LINE.format(rank=1, step=2), job)  # rank 1 inside step 2
    job.send_signal(signal.SIGUSR1)
    job.wait(timeout=240)
    stdout, stderr = output(job_out)
    assert job.returncode == 0, stderr[-3000:]
    assert "USR1 received" in stdout and log.read_text().split() == ["requeue", "4242"], stdout
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    if mode == "torchrun":
        return  # the resume is the same as in task mode

    requeued = subprocess.run(script, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ok(requeued)
    assert losses(run_dir) == losses(reference)


def test_a_rank_stalled_in_the_ring_is_named_in_the_hang_report(tmp_path):
    """Rank 1 sleeps inside its first ring step of step 2; rank 0 waits on it. Within one
    ``parallel.timeout_s`` the job ends (status 4) and hang_report.json names rank 1 and the ring wait."""
    began = time.monotonic()
    proc = megaring_train(tmp_path, "parallel.timeout_s=10",
                          env={"MEGARING_TEST_FAULT": "ringsleep:rank=1:step=2:seconds=900"})
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert time.monotonic() - began < 600  # the job does not wait for the sleeper
    assert "stalled rank(s): [1]" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((tmp_path / "hang_report.json").read_text())
    assert report["stalled_ranks"] == [1] and report["silent_ranks"] == [1]
    (line,) = report["ranks"]
    assert line["rank"] == 0 and line["step"] == 2 and line["phase"] == "forward" and line["peers"] == [1]
    assert line["waiting_on"].startswith("ring K/V recv from rank 1, send to rank 1, at ring step 0"), line
    assert line["waited_s"] >= 9


def test_sigterm_to_torchrun_during_a_save_completes_it_and_the_rerun_is_bit_identical(reference, tmp_path):
    """``launch/torchrun.sh`` hands the signal to the workers (torchrun itself would exit 1). It arrives
    while rank 0 sleeps inside step 2's periodic save (its files written, rank 1 at the barrier): the
    save completes, the ranks agree to stop after step 2, exit 0, and the same command resumes."""
    env = clean_env(NPROC="2", PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    script = ["bash", str(ROOT / "launch" / "torchrun.sh"), *RUN, "trainer.checkpoint_every=2",
              f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(script, env=env | {"MEGARING_TEST_FAULT": "slowsave:rank=0:step=2:seconds=3"}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "checkpoints"
    wait_for(ckpt / "step_00000002.partial" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM received" in stderr and "stopped after step 2" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert [p.name for p in ckpt.glob("step_*")] == ["step_00000002"]  # complete, no .partial
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2]

    ok(subprocess.run(script, env=env | {"MASTER_PORT": str(free_port())}, cwd=ROOT, capture_output=True, text=True,
                      timeout=300))
    assert losses(tmp_path) == losses(reference)


def test_a_second_sigterm_during_the_save_exits_at_once_and_latest_stays(reference, tmp_path):
    """The first SIGTERM arrives in step 2, whose save is slowed; the second one, during that save,
    ends the run at once (128 + 15) without it: ``latest`` stays step 1, the resume is bit-identical."""
    overrides = ("trainer.checkpoint_every=1", "trainer.keep_last=4")
    proc = subprocess.Popen(command(tmp_path, *overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(MEGARING_TEST_FAULT="slowsave:rank=0:step=2:seconds=20"))
    ckpt = tmp_path / "checkpoints"
    wait_for(ckpt / "latest", proc, text="step_00000001")
    proc.send_signal(signal.SIGTERM)
    wait_for(ckpt / "step_00000002.partial" / "trainer_state.json", proc)
    time.sleep(1.2)  # a second signal, not the first one delivered twice
    proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert time.monotonic() - began < 10, stderr[-3000:]
    assert "second signal (SIGTERM): exiting without a new checkpoint" in stderr, stderr[-3000:]
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert not (ckpt / "step_00000002").exists()  # only the .partial one, never read

    ok(megaring_train(tmp_path, *overrides))
    assert losses(tmp_path) == losses(reference)
    assert not list(ckpt.glob("*.partial"))  # the next save removed it


def test_a_full_disk_during_a_save_names_enospc_and_the_directory(tmp_path):
    proc = megaring_train(tmp_path, "trainer.checkpoint_every=1", env={"MEGARING_TEST_FAULT": "enospc:rank=1:step=2"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert f"saving the checkpoint of step 2 into {ckpt} failed: no space left on device (ENOSPC" in proc.stderr
    assert "Traceback" not in proc.stderr and "timed out" not in proc.stderr, proc.stderr[-3000:]
    assert (ckpt / "latest").read_text() == "step_00000001"
