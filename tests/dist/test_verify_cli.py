"""``megaring-verify``: passes on the defaults at (dp, cp, tp) = (1, 2, 2); fails naming the step when a
test hook makes one rank's gradient wrong at step 2 (cp=2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.cli import clean_env

pytestmark = pytest.mark.slow


def megaring_verify(tmp_path, *overrides: str, env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "megaring.cli.verify", *overrides, "parallel.timeout_s=60",
           f"hydra.run.dir={tmp_path}"]
    return subprocess.run(cmd, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=400)


def test_verify_passes_at_1_2_2(tmp_path):
    proc = megaring_verify(tmp_path, "parallel.cp=2", "parallel.tp=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=1 cp=2 tp=2" in proc.stdout and proc.stdout.count("  pass\n") == 4, proc.stdout[-2000:]
    assert "  ring attention forward/backward (cp=2 zigzag" in proc.stdout, proc.stdout[-2000:]
    assert "megaring-verify: pass" in proc.stdout


def test_verify_fails_naming_the_step_of_a_wrong_gradient(tmp_path):
    proc = megaring_verify(tmp_path, "parallel.cp=2", env={"MEGARING_TEST_FAULT": "scalegrad:rank=1:step=2:factor=3"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "step 1:" in proc.stdout and "FAIL" in proc.stdout.split("step 2:")[1].splitlines()[0], proc.stdout[-2000:]
    assert "megaring-verify: FAIL: step 2 differs from the single-process run" in proc.stderr


def test_ring_check_passes_and_fails_on_a_dropped_ring_block(monkeypatch):
    """The ring attention check alone, at cp=2 in the configured layout and kernel: it passes, and fails
    when a test hook drops rank 1's second block (its first remote K/V block)."""
    import torch

    from megaring.cli.verify import ring_check
    from tests.helpers.train_cfg import compose_cfg

    cfg = compose_cfg("model=tiny", "parallel.cp=2", "parallel.attn_kernel=cpu_flash")
    line, passed = ring_check(cfg, torch.float32)
    assert passed and line.endswith("  pass") and "cp=2 zigzag kernel=cpu_flash" in line, line
    monkeypatch.setenv("MEGARING_TEST_FAULT", "ringdrop:rank=1:call=1")  # the spawned workers inherit it
    line, passed = ring_check(cfg, torch.float32)
    assert not passed and line.endswith("  FAIL"), line
