"""megaring: sequence-parallel LLM training (ring attention x ZeRO x tensor parallelism).

The top-level names load lazily, so that ``import megaring.data`` (tokenising, preprocessing)
does not pull in the attention kernels or torch.distributed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ring_attention": "megaring.ring.attention",
    "context_attention": "megaring.ulysses.attention",
    "RingSettings": "megaring.ring.settings",
    "shard_sequence": "megaring.layout",
    "unshard_sequence": "megaring.layout",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megaring' has no attribute {name!r}")
