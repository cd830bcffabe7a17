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
  step of that step, before waiting on its transfers (a rank stalled in the ring, for hang reports);
- ``slowsave:rank=<r>:step=<s>:seconds=<t>``: that rank sleeps ``t`` seconds inside the save of that
  step's checkpoint, after writing its files into the ``.partial`` directory (a signal during a save);
- ``enospc:rank=<r>:step=<s>``: that rank's save of that step's checkpoint fails as on a full disk
  (``OSError(ENOSPC)`` after its files are written);
- ``ringdrop:rank=<r>:call=<i>``: in ``megaring-verify``'s ring attention check, that rank's block
  kernel returns "no keys" for its ``i``-th forward call (from 0), as if that ring step's K/V block
  had never arrived: the check must fail.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import torch
from torch import nn

from megaring.distributed.flight import FLIGHT

ENV = "MEGARING_TEST_FAULT"
KINDS = ("kill", "nan", "scalegrad", "sleep", "ringsleep", "slowsave", "enospc", "ringdrop")
SAVE_KINDS = ("slowsave", "enospc")  # fire inside a checkpoint save (in_save), not at the step start
log = logging.getLogger(__name__)


def parse_fault(spec: str) -> tuple[str, dict[str, int]]:
    kind, *fields = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"{ENV}={spec!r}: the kind must be one of {KINDS} (see megaring/ops/faults.py)")
    return kind, {k: int(v) for k, v in (f.split("=", 1) for f in fields)}


def _fault_here(rank: int, step: int) -> tuple[str, dict[str, int]] | None:
    """The fault of ``MEGARING_TEST_FAULT`` when it applies to this rank and step, else None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, fault = parse_fault(spec)
    if kind == "ringdrop" or fault.get("rank") != rank:
        return None
    if not fault["step"] <= step <= fault.get("until", fault["step"]):
        return None
    return kind, fault


def in_save(rank: int, step: int, directory) -> None:
    """Called by every rank inside the save of ``step``'s checkpoint, its files written to ``directory``."""
    here = _fault_here(rank, step)
    if here is None or here[0] not in SAVE_KINDS:
        return
    kind, fault = here
    log.warning("%s: %s on rank %d in the save of step %d", ENV, kind, rank, step)
    if kind == "slowsave":
        time.sleep(fault["seconds"])
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))


def maybe_inject(rank: int, step: int, model: nn.Module | None = None) -> None:
    here = _fault_here(rank, step)
    if here is None or here[0] in SAVE_KINDS:
        return
    kind, fault = here
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


def ring_drop() -> tuple[int, int] | None:
    """``(rank, forward call)`` of a ``ringdrop`` fault, else None (megaring-verify's ring check)."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, fault = parse_fault(spec)
    return (fault["rank"], fault["call"]) if kind == "ringdrop" else None


def sleep_once_in_ring(seconds: float):
    def hook(what: str) -> None:
        if what.startswith("ring") and FLIGHT.before_wait is hook:
            FLIGHT.before_wait = None
            time.sleep(seconds)
    return hook
