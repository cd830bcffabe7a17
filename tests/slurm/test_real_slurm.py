"""megaring on a real (one-node) slurm: ``sbatch launch/slurm.sbatch`` in both modes, a Hydra sweep
through submitit, a job that does not fit, and a lost rank followed by a resubmission that resumes.

The cluster is the session's ``slurm_cluster`` (tests/slurm/conftest.py): this machine's CPUs in
one partition, gloo. Runs are the tiny model on mock data, seq_len 64, two steps, so the losses
of a slurm job can be compared bit for bit with the same run under megaring's own spawner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT, clean_env, losses, ok

pytestmark = pytest.mark.slurm

RUN = ["model=tiny", "data=mock", "trainer.seq_len=64", "trainer.global_batch_size=2", "trainer.max_steps=2",
       "logging.wandb.mode=disabled", "logging.progress_bar=false", "parallel.timeout_s=60"]
CP2 = [*RUN, "parallel.cp=2"]
BIN = Path(sys.executable).parent
# One task per rank, or one task running torchrun for both ranks; no GPUs (the script's default asks for 8).
SBATCH_SIZES = {"task": ["--ntasks-per-node=2", "--cpus-per-task=1"],
                "torchrun": ["--ntasks-per-node=1", "--cpus-per-task=2"]}


def job_env(cluster, **extra: str) -> dict[str, str]:
    """The submitter's environment, which slurm hands to the job: this venv first (as ``make`` has it,
    so DeepSpeed's JIT op is not rebuilt by another ninja), this checkout, the cluster's SLURM_CONF."""
    return clean_env(PATH=f"{BIN}:{cluster.env['PATH']}", SLURM_CONF=cluster.env["SLURM_CONF"],
                     PYTHON=sys.executable, **extra)


def sbatch(cluster, mode: str, out_dir: Path, overrides: list[str], **env_extra: str) -> str:
    """Submit ``launch/slurm.sbatch`` at this mode on two ranks; the job id."""
    cmd = ["sbatch", "--parsable", "--nodes=1", *SBATCH_SIZES[mode], "--gpus-per-node=0",
           f"--output={out_dir}/slurm-%j.out", f"--chdir={ROOT}", "launch/slurm.sbatch", *overrides]
    env = job_env(cluster, MODE=mode, **({"GPUS_PER_NODE": "2"} if mode == "torchrun" else {}), **env_extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    ok(proc)
    return proc.stdout.strip().split(";")[0]


def job_output(out_dir: Path, job_id: str) -> str:
    return (out_dir / f"slurm-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def spawned_cp2(tmp_path_factory) -> Path:
    """The reference: the same run under megaring's own spawner (``parallel.nproc_per_node=2``)."""
    run_dir = tmp_path_factory.mktemp("spawned") / "run"
    cmd = [sys.executable, "-m", "megaring.train", *CP2, "parallel.nproc_per_node=2", f"hydra.run.dir={run_dir}"]
    ok(subprocess.run(cmd, cwd=ROOT, env=clean_env(PATH=f"{BIN}:{clean_env()['PATH']}"), capture_output=True,
                      text=True, timeout=240))
    return run_dir


@pytest.mark.parametrize("mode", ["task", "torchrun"])
def test_sbatch_matches_the_spawned_run_bit_for_bit(slurm_cluster, spawned_cp2, mode, tmp_path):
    job_id = sbatch(slurm_cluster, mode, tmp_path, [*CP2, f"hydra.run.dir={tmp_path / 'run'}"])
    state, output = slurm_cluster.wait_job(job_id, 240), job_output(tmp_path, job_id)
    assert state == "COMPLETED", output[-4000:]
    assert f"megaring: mode={mode} nodes=1 tasks={1 if mode == 'torchrun' else 2}" in output
    assert losses(tmp_path / "run") == losses(spawned_cp2)  # (step, loss, grad_norm), exactly
    assert [s for s, _, _ in losses(spawned_cp2)] == [1, 2]


def sweep(cluster, sweep_dir: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megaring.train", "-m", "hydra/launcher=slurm_cpu", *RUN, *overrides,
           f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=job_env(cluster), capture_output=True, text=True, timeout=timeout)


def test_hydra_sweep_through_submitit_sizes_each_job(slurm_cluster, tmp_path):
    """cp x zero_stage = 4 jobs of 1 or 2 tasks; every run completes in the sweep directory, and plots."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep(slurm_cluster, sweep_dir, "parallel.cp=1,2", "parallel.zero_stage=1,2")
    ok(proc)
    assert "Bypassing sacct error" not in proc.stdout + proc.stderr  # watched with squeue: readable logs
    assert proc.stdout.count("1 node(s) x 2 task(s)") == 2 and proc.stdout.count("1 node(s) x 1 task(s)") == 2
    runs = sorted(sweep_dir.glob("*/metrics.jsonl"))
    assert len(runs) == 4, list(sweep_dir.iterdir())
    for metrics in runs:
        assert [s for s, _, _ in losses(metrics.parent)] == [1, 2]
    out = tmp_path / "plots"
    ok(subprocess.run([sys.executable, "tools/plot_runs.py", str(sweep_dir), "--out", str(out)], cwd=ROOT,
                      env=clean_env(), capture_output=True, text=True, timeout=120))
    assert (out / "loss.png").stat().st_size > 10_000 and (out / "scaling.png").stat().st_size > 10_000
    rows = json.loads((out / "runs.json").read_text())
    assert sorted((r["cp"], r["world_size"]) for r in rows) == [(1, 1), (1, 1), (2, 2), (2, 2)]


def test_a_job_larger_than_the_partition_is_refused_before_submission(slurm_cluster, tmp_path):
    too_many = 2 * slurm_cluster.cpus
    proc = sweep(slurm_cluster, tmp_path / "sweep", f"parallel.dp=1,{too_many}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "megaring-train: nothing submitted" in proc.stderr and "Traceback" not in proc.stderr
    assert "job #1 (" in proc.stderr and f"parallel.dp={too_many}) needs" in proc.stderr
    assert f"{too_many} tasks x 1 CPUs = {too_many} CPUs per node, its nodes have {slurm_cluster.cpus}" in proc.stderr
    assert not list((tmp_path / "sweep").glob(".submitit/*"))


def rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of one rank's training process of this job (its task's environment names both)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"megaring.train" in (proc / "cmdline").read_bytes() and \
                    want <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except OSError:
            continue
    return None


def wait_until(ready, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := ready()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_lost_rank_ends_the_job_and_a_resubmission_resumes(slurm_cluster, tmp_path):
    """SIGKILL one rank's process after a checkpoint: the job fails naming it; the same sbatch resumes."""
    run_dir = tmp_path / "run"
    overrides = [*CP2, "trainer.max_steps=20", "trainer.checkpoint_every=1", f"hydra.run.dir={run_dir}"]
    job_id = sbatch(slurm_cluster, "task", tmp_path, overrides)
    wait_until(lambda: (run_dir / "checkpoints" / "latest").is_file(), 180, "the first checkpoint")
    pid = wait_until(lambda: rank_pid(job_id, 1), 10, "rank 1's process")
    subprocess.run(["kill", "-KILL", str(pid)], check=True)
    assert slurm_cluster.wait_job(job_id, 120) == "FAILED"
    output = job_output(tmp_path, job_id)
    assert "task 1: Killed" in output and "megaring: training failed" in output, output[-3000:]
    killed_at = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    assert killed_at < 20
    before = (run_dir / "metrics.jsonl").read_text().splitlines()[:killed_at]

    again = sbatch(slurm_cluster, "task", tmp_path, overrides)
    assert slurm_cluster.wait_job(again, 240) == "COMPLETED", job_output(tmp_path, again)[-4000:]
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == list(range(1, 21))
    assert after[:killed_at] == before  # kept as written (timings too): steps after the checkpoint only were run


@pytest.mark.skipif(os.environ.get("MEGARING_SLURM_REQUEUE_TEST") != "1",
                    reason="about one run in four on the one-node test cluster, the self-requeued job is left "
                           "FAILED with no second attempt (under investigation); MEGARING_SLURM_REQUEUE_TEST=1 runs it")
def test_usr1_before_the_time_limit_saves_requeues_and_the_job_ends_like_an_uninterrupted_run(
        slurm_cluster, tmp_path):
    """Preemption the way slurm does it: the time-limit warning (USR1 to the batch script, as
    ``--signal=B:USR1@600`` sends it) makes the step save at an agreed step; the script requeues the
    job, and the requeued job resumes and ends bit-identical to an uninterrupted run."""
    overrides = [*CP2, "trainer.max_steps=8"]
    reference = tmp_path / "reference"
    cmd = [sys.executable, "-m", "megaring.train", *overrides, "parallel.nproc_per_node=2",
           f"hydra.run.dir={reference}"]
    ok(subprocess.run(cmd, cwd=ROOT, env=clean_env(PATH=f"{BIN}:{clean_env()['PATH']}"), capture_output=True,
                      text=True, timeout=240))
    run_dir = tmp_path / "run"
    # Rank 0 pauses before step 4, so the warning surely lands mid-run (the steps take milliseconds).
    job_id = sbatch(slurm_cluster, "task", tmp_path, [*overrides, f"hydra.run.dir={run_dir}"],
                    MEGARING_TEST_FAULT="sleep:rank=0:step=4:seconds=15")
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 180, "two steps")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id, timeout=30)
    # The requeue kills the first attempt (its state can read FAILED or CANCELLED for a moment), then
    # the job is PENDING again: only a terminal state that stays for 20 s ends the wait.
    deadline, seen, ended_since, nudged = time.monotonic() + 300, set(), None, False
    while (state := slurm_cluster.job_state(job_id)) != "COMPLETED":
        if state == "PENDING" and "RUNNING" in seen and not nudged:  # requeued: start it now, not after
            slurm_cluster.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")  # slurm's delay
            nudged = True
        seen.add(state)
        terminal = state in ("FAILED", "CANCELLED", "TIMEOUT")
        ended_since = (ended_since or time.monotonic()) if terminal else None
        if ended_since is not None and time.monotonic() - ended_since > 20:
            break
        assert time.monotonic() < deadline, f"job {job_id} still {state} (seen {sorted(seen)})"
        time.sleep(0.2)
    assert state == "COMPLETED", job_output(tmp_path, job_id)[-4000:]
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(saved) >= 2, saved  # the preemption save, then the final one of the requeued run
    assert losses(run_dir) == losses(reference)  # (step, loss, grad_norm) of steps 1-8, exactly
