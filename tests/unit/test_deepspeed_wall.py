"""DeepSpeed behind one wall: its internals are named in ``megaring/engine/deepspeed_internals.py``
only, and DeepSpeed is imported by that module and the engine only."""

from __future__ import annotations

import re

from megaring.engine import deepspeed_internals
from tests.helpers.cli import ROOT

INTERNALS = ("_hp_mapping", "fp16_groups", "fp32_groups", "fp32_partitioned_groups_flat", "_lazy_init_hp_params",
             "_hp_optimizer_states_linked", "ds_tensor", "ds_id", "ds_numel", "ds_shape", "ds_zero_partition_rank",
             "checkpoint_engine", "TorchCheckpointEngine", "check_grad_overflow", "_z3_optimizer")
IMPORTS = re.compile(r"^\s*(from deepspeed[\s.]|import deepspeed)", re.M)
WALL = "megaring/engine/deepspeed_internals.py"


def test_deepspeed_internals_live_in_one_module():
    offenders = []
    for path in sorted((ROOT / "megaring").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == WALL:
            continue
        text = path.read_text()
        offenders += [f"{rel}: {name}" for name in INTERNALS if re.search(rf"\b{name}\b", text)]
        if IMPORTS.search(text) and rel != "megaring/engine/deepspeed_engine.py":
            offenders.append(f"{rel}: imports deepspeed")
    assert offenders == []
    wall = (ROOT / WALL).read_text()
    assert all(name in wall for name in INTERNALS)


def test_the_tested_range_is_the_one_pyproject_pins():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"deepspeed{deepspeed_internals.TESTED_RANGE}"' in pyproject
    assert deepspeed_internals.version_problem("0.19.8", allow_untested=False) is None
