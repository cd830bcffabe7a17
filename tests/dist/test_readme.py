"""The README's commands and code run as written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.cli import ROOT, clean_env


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@pytest.mark.slow
def test_ring_attention_snippet_runs_under_torchrun_and_exits_cleanly(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_block("### Ring attention from Python")
                      + "\nprint(f'grad_ok={float(q.grad.abs().sum()) > 0}', flush=True)\n")  # one write per rank
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                          env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("grad_ok=True") == 2
    assert "terminate called" not in proc.stderr
