"""Run megaring's commands in subprocesses the way users do, with a clean launcher environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megaring.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """No launcher variables from the test process; wandb quiet and offline-capable without a key."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE", "WANDB_API_KEY")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return env | {"WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)} | extra


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad norm) of every logged step."""
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir / "metrics.jsonl")]
