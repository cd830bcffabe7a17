"""``megaring-verify``'s config handling: the layout it was given is checked before it shrinks the run,
and the shrunk runs keep what training accepts (Ulysses inside cp included)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megaring.cli.verify import ring_check, shrink, single_process, verify
from megaring.errors import ConfigError
from megaring.train.config_checks import collect_problems
from tests.helpers.cli import clean_env
from tests.helpers.train_cfg import compose_cfg


def test_a_bad_layout_is_reported_with_the_key_given_not_the_shrunk_seq_len(tmp_path):
    with pytest.raises(ConfigError) as err:
        verify(compose_cfg("parallel.cp=0", "parallel.tp=0"), tmp_path)
    msg = str(err.value)
    assert "parallel.cp=0 must be an integer >= 1" in msg and "parallel.tp=0" in msg and "seq_len" not in msg
    with pytest.raises(ConfigError, match="parallel.ulysses=3 must divide parallel.cp=2"):
        verify(compose_cfg("parallel.cp=2", "parallel.ulysses=3"), tmp_path)
    assert not (tmp_path / "reference").exists()  # refused before any run


@pytest.mark.parametrize("cp, ulysses", [(2, 2), (4, 2)])
def test_ulysses_layouts_shrink_to_runs_training_accepts(cp, ulysses):
    small = shrink(compose_cfg(f"parallel.cp={cp}", f"parallel.ulysses={ulysses}"))
    assert (small.parallel.cp, small.parallel.ulysses) == (cp, ulysses)
    assert collect_problems(small, world_size=cp) == []
    reference = single_process(small)
    assert (reference.parallel.cp, reference.parallel.ulysses) == (1, 1)
    assert collect_problems(reference, world_size=1) == []


def test_pure_ulysses_has_no_ring_to_check():
    line, passed = ring_check(shrink(compose_cfg("parallel.cp=2", "parallel.ulysses=2")), torch.float32)
    assert passed and line == "  ring attention: cp=2 with ulysses=2, no ring to check"


def test_verify_cli_exits_2_naming_cp(tmp_path):
    cmd = [sys.executable, "-m", "megaring.cli.verify", "parallel.cp=0", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "megaring-verify: invalid training config (1 problem):\n  - parallel.cp=0 must be an integer >= 1" \
        in proc.stderr and "Traceback" not in proc.stderr
