"""Fault injection for the test suite, never part of a user's config.

A test sets ``MEGARING_TEST_FAULT=kill:rank=<r>:step=<s>`` in the environment of a training
command; that rank then exits abruptly in the middle of that step, as a crashed GPU process would.
"""

from __future__ import annotations

import logging
import os

ENV = "MEGARING_TEST_FAULT"
log = logging.getLogger(__name__)


def parse_fault(spec: str) -> dict[str, int]:
    kind, *fields = spec.split(":")
    if kind != "kill":
        raise ValueError(f"{ENV}={spec!r}: only 'kill:rank=<r>:step=<s>' is known")
    return {k: int(v) for k, v in (f.split("=", 1) for f in fields)}


def maybe_inject(rank: int, step: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    fault = parse_fault(spec)
    if fault.get("rank") == rank and fault.get("step") == step:
        log.error("%s: rank %d exits at step %d", ENV, rank, step)
        os._exit(17)
