"""Imported once, by the forkserver the test pools fork their workers from (tests/helpers/pool.py):
what every worker needs, so that no worker imports it again."""

import importlib

import torch  # noqa: F401
import torch.distributed  # noqa: F401

# megaring's trainer, and what a first training imports besides: DeepSpeed's engine, its op
# builders, and the optimizer check that imports DeepSpeed's Muon, which torch.compile-s at import
# (inductor). Each on its own: one that is missing (another DeepSpeed) does not stop the others.
MODULES = ("deepspeed", "megaring.train.trainer", "deepspeed.runtime.engine", "deepspeed.ops.op_builder.all_ops",
           "deepspeed.runtime.zero.muon.muon_optimizer", "torch.utils.cpp_extension")
for name in MODULES:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken import fails in the worker that needs it, with its traceback
        pass
