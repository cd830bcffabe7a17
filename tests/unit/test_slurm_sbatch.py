"""``launch/slurm.sbatch`` on its own, with stand-ins for slurm's commands and for the training step
(no torch, a few seconds): its settings checks, and the time-limit warning it sends itself, scaled
to short limits. The real-slurm tests (tests/slurm/test_real_slurm.py) run it with real jobs."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from pathlib import Path

from tests.helpers.cli import ROOT, clean_env

SCRIPT = ROOT / "launch" / "slurm.sbatch"
# srun runs its command in place; scancel fails, so the script signals the step itself (kill -TERM).
FAKE_SRUN = '#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n'
FAKE_SCANCEL = "#!/usr/bin/env bash\nexit 1\n"
# scontrol: the node list, this job's start and end time, and requeue requests (logged).
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo localhost ;;
  "show job") echo "JobId=4242 JobName=megaring TimeLimit=x StartTime=$FAKE_START EndTime=$FAKE_END Partition=debug" ;;
  *) echo "$@" >> "$SCONTROL_LOG" ;;
esac
"""
# The training step: runs up to 60 s; a TERM makes it "save" and exit 0, as megaring-train does.
FAKE_STEP = """#!/usr/bin/env bash
trap 'echo "step: TERM after $SECONDS s"; exit 0' TERM
for ((i = 0; i < 600 && i < ${FAKE_STEP_TENTHS:-600}; i++)); do sleep 0.1; done
echo "step: done"
"""


def fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL),
                       ("step", FAKE_STEP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def iso(epoch: float) -> str:
    """A time as slurm prints it (local time, to the second)."""
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%dT%H:%M:%S")


def run_script(tmp_path: Path, start: float, end: float, timeout: float = 60, **env: str):
    bin_dir = fake_slurm(tmp_path)
    full_env = clean_env(PATH=f"{bin_dir}:{clean_env()['PATH']}", PYTHON=str(bin_dir / "step"), SLURM_JOB_ID="4242",
                         SLURM_NNODES="1", SLURM_NTASKS="1", SLURM_JOB_NODELIST="localhost",
                         SCONTROL_LOG=str(tmp_path / "scontrol.log"), FAKE_START=iso(start), FAKE_END=iso(end),
                         **{"MODE": "task", **env})
    began = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=full_env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - began


def requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.is_file() else []


def test_a_ten_minute_job_is_warned_a_quarter_of_its_limit_before_the_end_not_at_its_start(tmp_path):
    """A 600-s limit with WARN_S=600 (the default) would warn at the start; the lead is 25 % of the limit,
    150 s: with 155 s left the warning comes about 5 s later, the step saves and the job is requeued."""
    now = time.time()
    proc, took = run_script(tmp_path, start=now - 445, end=now + 155)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "time limit 600 s: warning the job step 150 s before it" in proc.stdout, proc.stdout
    assert "time limit in 150 s (warning 150 s before it)" in proc.stdout, proc.stdout
    assert "USR1 received" in proc.stdout and "step: TERM after" in proc.stdout, proc.stdout
    assert "saved after USR1; requeueing job 4242" in proc.stdout, proc.stdout
    assert requeues(tmp_path) == ["requeue 4242"]
    assert 3 <= took < 30  # the warning waited for its time (the step would run 60 s)


def test_a_long_job_keeps_warn_s_and_ends_without_a_warning_when_its_step_finishes_first(tmp_path):
    now = time.time()
    proc, took = run_script(tmp_path, start=now, end=now + 24 * 3600, FAKE_STEP_TENTHS="20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "time limit 86400 s: warning the job step 600 s before it" in proc.stdout, proc.stdout
    assert "step: done" in proc.stdout and "USR1" not in proc.stdout, proc.stdout
    assert requeues(tmp_path) == [] and took < 30


def test_bad_settings_are_refused_all_at_once_before_the_step_starts(tmp_path):
    now = time.time()
    proc, _ = run_script(tmp_path, start=now, end=now + 600, MODE="torchrun", PREEMPT_EXIT_CODE="3", WARN_S="10m",
                         WARN_MAX_PERCENT="0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "WARN_S=10m must be a whole number of seconds" in proc.stderr
    assert "WARN_MAX_PERCENT=0 must be a whole number in 1..100" in proc.stderr
    assert "PREEMPT_EXIT_CODE=3 needs MODE=task: torchrun reports any non-zero worker status as 1" in proc.stderr
    assert "step:" not in proc.stdout and "megaring: mode=" not in proc.stdout
