"""The training loop: config schema and checks, the step, schedule, guards, evaluation loss, metrics.

``TrainConfig``, ``to_train_config`` and ``train`` load lazily, so that the checkpoint, engine and
operations packages can import the config schema without pulling in the whole trainer.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "megaring.train.config",
    "to_train_config": "megaring.train.config",
    "train": "megaring.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megaring.train' has no attribute {name!r}")
