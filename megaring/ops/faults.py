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
from dataclasses import dataclass, field

import torch
from torch import nn

from megaring.distributed.flight import FLIGHT

ENV = "MEGARING_TEST_FAULT"
KINDS = ("kill", "nan", "scalegrad", "sleep", "ringsleep", "slowsave", "enospc", "ringdrop")
SAVE_KINDS = ("slowsave", "enospc")  # fire inside a checkpoint save (Fault.in_save), not at the step start
STEP_KINDS = ("kill", "nan", "scalegrad", "sleep", "ringsleep")  # fire at a step's start (Fault.at_step)
log = logging.getLogger(__name__)


def parse_fault(spec: str) -> tuple[str, dict[str, int]]:
    kind, *fields = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"{ENV}={spec!r}: the kind must be one of {KINDS} (see megaring/ops/faults.py)")
    return kind, {k: int(v) for k, v in (f.split("=", 1) for f in fields)}


@dataclass(frozen=True)
class Fault:
    """The fault of ``MEGARING_TEST_FAULT``, parsed once (:meth:`from_env`) and kept on the run;
    ``kind`` None: no fault (every hook returns at once)."""

    kind: str | None = None
    fields: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Fault:
        spec = os.environ.get(ENV)
        return cls(*parse_fault(spec)) if spec else cls()

    def _here(self, rank: int, step: int, kinds: tuple[str, ...]) -> bool:
        f = self.fields
        return (self.kind in kinds and f.get("rank") == rank
                and f["step"] <= step <= f.get("until", f["step"]))

    def in_save(self, rank: int, step: int, directory) -> None:
        """Called by every rank inside the save of ``step``'s checkpoint, its files written to ``directory``."""
        if not self._here(rank, step, SAVE_KINDS):
            return
        log.warning("%s: %s on rank %d in the save of step %d", ENV, self.kind, rank, step)
        if self.kind == "slowsave":
            time.sleep(self.fields["seconds"])
        if self.kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    def at_step(self, rank: int, step: int, model: nn.Module | None = None) -> None:
        """Called by every rank at the start of ``step``."""
        if not self._here(rank, step, STEP_KINDS):
            return
        kind, fault = self.kind, self.fields
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

    def ring_drop(self) -> tuple[int, int] | None:
        """``(rank, forward call)`` of a ``ringdrop`` fault, else None (megaring-verify's ring check)."""
        return (self.fields["rank"], self.fields["call"]) if self.kind == "ringdrop" else None


NO_FAULT = Fault()


def ring_drop() -> tuple[int, int] | None:
    """:meth:`Fault.ring_drop` of the environment's fault (megaring-verify reads it once per check)."""
    return Fault.from_env().ring_drop()


def sleep_once_in_ring(seconds: float):
    def hook(what: str) -> None:
        if what.startswith("ring") and FLIGHT.before_wait is hook:
            FLIGHT.before_wait = None
            time.sleep(seconds)
    return hook
