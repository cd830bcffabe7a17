"""Fault injection for the test suite, never part of a user's config.

A test sets ``MEGARING_TEST_FAULT`` in the environment of a training command:

- ``kill:rank=<r>:step=<s>``: that rank exits abruptly in the middle of that step, as a crashed
  GPU process would;
- ``nan:rank=<r>:step=<s>[:until=<u>]``: that rank's gradient of the first parameter is NaN in
  steps ``s..u`` (the loss stays finite), as an overflow in one rank's backward would be;
- ``scalegrad:rank=<r>:step=<s>:factor=<f>``: that rank's gradient of the first parameter is
  multiplied by ``f`` in that step (a wrong gradient that stays finite: ``megaring-verify`` must fail);
- ``sleep:rank=<r>:step=<s>:seconds=<t>``: that rank sleeps ``t`` seconds before that step (a
  stalled rank, or a step boundary that comes too late for a preemption's grace period);
- ``ringsleep:rank=<r>:step=<s>:seconds=<t>``: that rank sleeps ``t`` seconds inside its first ring
  step of that step, before waiting on its transfers (a rank stalled in the ring, for hang reports).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from megaring.distributed.flight import FLIGHT

ENV = "MEGARING_TEST_FAULT"
KINDS = ("kill", "nan", "scalegrad", "sleep", "ringsleep")
log = logging.getLogger(__name__)


def parse_fault(spec: str) -> tuple[str, dict[str, int]]:
    kind, *fields = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"{ENV}={spec!r}: the kind must be one of {KINDS} (see megaring/train/faults.py)")
    return kind, {k: int(v) for k, v in (f.split("=", 1) for f in fields)}


def maybe_inject(rank: int, step: int, model: nn.Module | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    kind, fault = parse_fault(spec)
    if fault.get("rank") != rank or not fault["step"] <= step <= fault.get("until", fault["step"]):
        return
    log.warning("%s: %s on rank %d at step %d", ENV, kind, rank, step)
    if kind == "kill":
        os._exit(17)
    if kind == "sleep":
        time.sleep(fault["seconds"])
    if kind == "ringsleep":
        FLIGHT.before_wait = sleep_once_in_ring(fault["seconds"])
    if kind in ("nan", "scalegrad") and model is not None:
        param = next(p for p in model.parameters() if p.requires_grad)
        fired = []

        def poison(grad: torch.Tensor) -> torch.Tensor:  # once: this step's first backward only
            if fired:
                return grad
            fired.append(True)
            return torch.full_like(grad, float("nan")) if kind == "nan" else grad * fault["factor"]

        param.register_hook(poison)


def sleep_once_in_ring(seconds: float):
    def hook(what: str) -> None:
        if what.startswith("ring") and FLIGHT.before_wait is hook:
            FLIGHT.before_wait = None
            time.sleep(seconds)
    return hook
