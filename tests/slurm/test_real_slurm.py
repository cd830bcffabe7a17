"""megaring on a real (one-node) slurm: ``sbatch launch/slurm.sbatch`` in both modes, a Hydra sweep
through submitit, a job that does not fit, a lost rank followed by a resubmission that resumes, and
preemption: USR1 to the job's steps or to its batch script, and slurm's own time-limit warning.

The cluster is the session's ``slurm_cluster`` (tests/slurm/conftest.py): this machine's CPUs in
one partition, gloo. Runs are the tiny model on mock data, seq_len 64, two steps (eight at cp=2),
so the losses of a slurm job can be compared bit for bit with the same run under megaring's own
spawner, made once per module.
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
from tests.helpers.slurm_cluster import free_port

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


def sbatch(cluster, mode: str, out_dir: Path, overrides: list[str], *options: str, **env_extra: str) -> str:
    """Submit ``launch/slurm.sbatch`` at this mode on two ranks (and these sbatch options); the job id.
    The output file is appended to, so a requeued job's file holds every attempt."""
    cmd = ["sbatch", "--parsable", "--nodes=1", *SBATCH_SIZES[mode], "--gpus-per-node=0", *options,
           f"--output={out_dir}/slurm-%j.out", "--open-mode=append", f"--chdir={ROOT}", "launch/slurm.sbatch",
           *overrides]
    # A port of its own: job ids, from which the script derives one, repeat across test clusters.
    env = job_env(cluster, MODE=mode, MASTER_PORT=str(free_port()),
                  **({"GPUS_PER_NODE": "2"} if mode == "torchrun" else {}), **env_extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    ok(proc)
    return proc.stdout.strip().split(";")[0]


def job_output(out_dir: Path, job_id: str) -> str:
    """The job's output so far ("" before it starts)."""
    out = out_dir / f"slurm-{job_id}.out"
    return out.read_text() if out.is_file() else ""


LONG = [*CP2, "trainer.max_steps=8"]


@pytest.fixture(scope="module")
def spawned_8_steps(tmp_path_factory) -> Path:
    """The reference of every cp=2 job: 8 steps under megaring's own spawner (``parallel.nproc_per_node=2``)."""
    run_dir = tmp_path_factory.mktemp("spawned8") / "run"
    cmd = [sys.executable, "-m", "megaring.train", *LONG, "parallel.nproc_per_node=2", f"hydra.run.dir={run_dir}"]
    ok(subprocess.run(cmd, cwd=ROOT, env=clean_env(PATH=f"{BIN}:{clean_env()['PATH']}"), capture_output=True,
                      text=True, timeout=240))
    return run_dir


@pytest.mark.parametrize("mode", ["task", "torchrun"])
def test_sbatch_matches_the_spawned_run_bit_for_bit(slurm_cluster, spawned_8_steps, mode, tmp_path):
    job_id = sbatch(slurm_cluster, mode, tmp_path, [*LONG, f"hydra.run.dir={tmp_path / 'run'}"])
    state, output = slurm_cluster.wait_job(job_id, 240), job_output(tmp_path, job_id)
    assert state == "COMPLETED", output[-4000:]
    assert f"megaring: mode={mode} nodes=1 tasks={1 if mode == 'torchrun' else 2}" in output
    assert losses(tmp_path / "run") == losses(spawned_8_steps)  # (step, loss, grad_norm), exactly
    assert [s for s, _, _ in losses(spawned_8_steps)] == list(range(1, 9))


def sweep(cluster, sweep_dir: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megaring.train", "-m", "hydra/launcher=slurm_cpu", *RUN, *overrides,
           f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=job_env(cluster), capture_output=True, text=True, timeout=timeout)


def test_hydra_sweep_through_submitit_sizes_each_job(slurm_cluster, tmp_path):
    """Two jobs of 1 and 2 tasks (cp=1,2 at ZeRO-2); every run completes in the sweep directory, and plots."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep(slurm_cluster, sweep_dir, "parallel.cp=1,2", "parallel.zero_stage=2")
    ok(proc)
    assert "Bypassing sacct error" not in proc.stdout + proc.stderr  # watched with squeue: readable logs
    assert proc.stdout.count("1 node(s) x 2 task(s)") == 1 and proc.stdout.count("1 node(s) x 1 task(s)") == 1
    runs = sorted(sweep_dir.glob("*/metrics.jsonl"))
    assert len(runs) == 2, list(sweep_dir.iterdir())
    for metrics in runs:
        assert [s for s, _, _ in losses(metrics.parent)] == [1, 2]
    out = tmp_path / "plots"
    ok(subprocess.run([sys.executable, "tools/plot_runs.py", str(sweep_dir), "--out", str(out)], cwd=ROOT,
                      env=clean_env(), capture_output=True, text=True, timeout=120))
    assert (out / "loss.png").stat().st_size > 10_000 and (out / "scaling.png").stat().st_size > 10_000
    rows = json.loads((out / "runs.json").read_text())
    assert sorted((r["cp"], r["world_size"], r["zero_stage"]) for r in rows) == [(1, 1, 2), (2, 2, 2)]


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


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def test_usr1_to_the_steps_then_to_the_script_saves_requeues_and_ends_like_an_uninterrupted_run(
        slurm_cluster, spawned_8_steps, tmp_path):
    """Preemption the way slurm does it, both forms. ``scancel --signal=USR1`` reaches the job's
    steps: the ranks save at an agreed step and the job ends; ``scontrol requeue`` runs it again
    and it resumes. ``scancel --batch --signal=USR1`` reaches the batch script (as slurm's own
    ``--signal=B:USR1@<s>`` warning does): the step saves and the script requeues the job itself.
    The third attempt ends bit-identical to an uninterrupted run."""
    run_dir = tmp_path / "run"
    # Rank 0 pauses 4 s before steps 3-6, so each signal surely lands mid-run (the steps take milliseconds).
    job_id = sbatch(slurm_cluster, "task", tmp_path, [*LONG, f"hydra.run.dir={run_dir}"],
                    MEGARING_TEST_FAULT="sleep:rank=0:step=3:until=6:seconds=4")
    wait_until(lambda: logged_steps(run_dir) >= 2, 180, "two steps")
    slurm_cluster.run("scancel", "--signal=USR1", job_id, timeout=30)
    assert slurm_cluster.wait_job(job_id, 120) == "COMPLETED", job_output(tmp_path, job_id)[-4000:]
    first_stop = logged_steps(run_dir)
    assert 2 <= first_stop < 8 and (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{first_stop:08d}"

    ok(slurm_cluster.run("scontrol", "requeue", job_id))  # the batch script never saw that USR1
    wait_until(lambda: logged_steps(run_dir) > first_stop, 180, "the requeued job's first step")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id, timeout=30)
    assert slurm_cluster.wait_job(job_id, 300) == "COMPLETED", job_output(tmp_path, job_id)[-4000:]

    output = job_output(tmp_path, job_id)
    assert [f"restarts={n}" in output for n in range(3)] == [True] * 3, output[-4000:]
    assert "megaring: saved after USR1; requeueing job" in output and "Traceback" not in output
    assert losses(run_dir) == losses(spawned_8_steps)  # (step, loss, grad_norm) of steps 1-8, exactly
    assert f"SIGUSR1: stopped after step {first_stop}; checkpoint" in output  # the first save
    assert "SIGTERM: stopped after step" in output  # the second: the script's TERM to the step


def test_a_short_time_limit_is_not_warned_at_its_start(slurm_cluster, spawned_8_steps, tmp_path):
    """``--time=5``, shorter than the script's WARN_S=600: slurm's ``--signal=B:USR1@600`` would warn
    at slurmctld's first time-limit check and every requeued attempt again (save, requeue, over and
    over); the script warns 25 % of the limit, 75 s, before the end instead. Rank 0 sleeps 30 s before
    step 2, so the job lives through slurmctld's first check (every 30 s), and ends well before the
    warning (225 s after the start): one attempt, no USR1, the losses of an uninterrupted run."""
    run_dir = tmp_path / "run"
    job_id = sbatch(slurm_cluster, "task", tmp_path, [*LONG, f"hydra.run.dir={run_dir}"], "--time=5",
                    MEGARING_TEST_FAULT="sleep:rank=0:step=2:seconds=30")
    assert slurm_cluster.wait_job(job_id, 200) == "COMPLETED", job_output(tmp_path, job_id)[-4000:]
    output = job_output(tmp_path, job_id)
    assert "megaring: time limit 300 s: warning the job step 75 s before it" in output, output[-4000:]
    assert "restarts=1" not in output and "USR1" not in output, output[-4000:]
    assert losses(run_dir) == losses(spawned_8_steps)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEGARING_SLURM_TIME_LIMIT_TEST") != "1",
                    reason="about 2.5 minutes, most of it waiting for the time-limit warning 60 s after the start; "
                           "MEGARING_SLURM_TIME_LIMIT_TEST=1 runs it")
def test_the_time_limit_warning_saves_requeues_and_the_job_ends_like_an_uninterrupted_run(
        slurm_cluster, spawned_8_steps, tmp_path):
    """``--time=2`` and WARN_MAX_PERCENT=50: the script warns itself 60 s (half the limit) before it,
    60 s after the start (rank 0 sleeps through that moment before step 2, well after the trainer
    handles signals; 60 s leave a busy machine time to save and exit). The step saves, the script
    requeues the job, and the requeued attempt resumes and ends bit-identical to an uninterrupted run."""
    run_dir = tmp_path / "run"
    # parallel.timeout_s above the sleep: rank 1 waits on rank 0 in a collective meanwhile.
    job_id = sbatch(slurm_cluster, "task", tmp_path, [*LONG, "parallel.timeout_s=120", f"hydra.run.dir={run_dir}"],
                    "--time=2", WARN_MAX_PERCENT="50", MEGARING_TEST_FAULT="sleep:rank=0:step=2:seconds=55")
    wait_until(lambda: "restarts=1" in job_output(tmp_path, job_id), 240, "the requeued attempt")
    # Every attempt is warned anew; a longer limit for this one keeps it to one warning.
    ok(slurm_cluster.run("scontrol", "update", f"jobid={job_id}", "TimeLimit=10"))
    assert slurm_cluster.wait_job(job_id, 240) == "COMPLETED", job_output(tmp_path, job_id)[-4000:]
    output = job_output(tmp_path, job_id)
    assert "megaring: time limit 120 s: warning the job step 60 s before it" in output, output
    assert "(warning 60 s before it): asking the job step to save" in output, output
    assert "megaring: USR1 received" in output and "megaring: saved after USR1; requeueing job" in output, output
    assert "restarts=2" not in output
    assert losses(run_dir) == losses(spawned_8_steps)


def test_usr1_to_the_script_in_torchrun_mode_saves_requeues_and_ends_like_an_uninterrupted_run(
        slurm_cluster, spawned_8_steps, tmp_path):
    """torchrun mode: the script's TERM to the step reaches torchrun too (slurm signals every process of
    the step), which must leave it to the workers (``--signals-to-handle`` without SIGTERM): they save,
    exit 0, torchrun exits 0, and the script requeues; the second attempt resumes and ends like an
    uninterrupted run, bit for bit."""
    run_dir = tmp_path / "run"
    # Rank 0 pauses 6 s before step 3, so the signal, sent after step 2, surely lands mid-run (it takes
    # well under a second to reach the workers); the resumed attempt runs without pauses.
    job_id = sbatch(slurm_cluster, "torchrun", tmp_path, [*LONG, f"hydra.run.dir={run_dir}"],
                    MEGARING_TEST_FAULT="sleep:rank=0:step=3:seconds=6")
    wait_until(lambda: logged_steps(run_dir) >= 2, 180, "two steps")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id, timeout=30)
    assert slurm_cluster.wait_job(job_id, 300) == "COMPLETED", job_output(tmp_path, job_id)[-4000:]
    output = job_output(tmp_path, job_id)
    assert "restarts=1" in output and "restarts=2" not in output, output[-4000:]
    assert "megaring: saved after USR1; requeueing job" in output and "training failed" not in output, output[-4000:]
    assert "SIGTERM: stopped after step" in output and "Traceback" not in output, output[-4000:]
    assert losses(run_dir) == losses(spawned_8_steps)
