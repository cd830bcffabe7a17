"""``model.compile``: each transformer block through ``torch.compile``, ring attention left opaque.

Ring attention communicates and is its own autograd function, so the compiler must not trace it:
``megaring.ring.attention.ring_attention`` is ``torch.compiler.disable``d, which makes it the one
(documented) graph break in a block: the block compiles as the graph before attention and the graph
after it, and ring attention runs eagerly between them.
The blocks are compiled as they are called (no module wrapper, so parameter names and state dicts
do not change). A compile failure (an unsupported construct, a broken backend) is never a wrong
result: the runner warns once and runs every block eagerly from then on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class BlockRunner:
    """Calls a block compiled (``backend``, default inductor), or eagerly after the first failure."""

    def __init__(self, backend: str | Callable = "inductor"):
        self.backend = backend
        self.compiled: dict[int, Callable] = {}
        self.failed = False

    def __call__(self, block: nn.Module, *args):
        if self.failed:
            return block(*args)
        fn = self.compiled.get(id(block))
        if fn is None:
            fn = self.compiled[id(block)] = torch.compile(block, backend=self.backend)
        try:
            return fn(*args)
        except Exception as err:  # a compiler failure means eager, never a wrong result
            if not _is_compile_failure(err):
                raise
            warnings.warn(f"model.compile: torch.compile failed ({type(err).__name__}: {err}); "
                          "running the blocks eagerly", RuntimeWarning, stacklevel=2)
            self.failed = True
            return block(*args)


def _is_compile_failure(err: Exception) -> bool:
    """Dynamo and its backends raise from ``torch._dynamo.exc`` (or wrap the backend's error in one)."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))
