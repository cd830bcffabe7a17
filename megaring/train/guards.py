"""Numerical guards: skipped non-finite steps, a stop after too many in a row, loss spikes, and
the count of steps skipped because their global batch held no trained token (``skipped_empty``).

Every input here is the same on all ranks (the loss is all-reduced, the gradient norm is global
and DeepSpeed agrees on a skip over the whole mesh), so all ranks take the same decision without
another collective.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from megaring.train.step import StepResult

DIVERGED_EXIT_CODE = 3


class Diverged(RuntimeError):
    """Too many consecutive non-finite steps; the message names the step and what was non-finite."""


def nonfinite_parts(result: StepResult) -> list[str]:
    out = []
    if not math.isfinite(result.loss):
        out.append(f"loss {result.loss}")
    if result.grad_norm is not None and not math.isfinite(result.grad_norm):
        out.append(f"gradient norm {result.grad_norm}")
    if not out and not result.applied:
        out.append("gradients (the optimizer skipped the update)")
    return out


class NumericGuard:
    """Counts bad steps (non-finite loss or gradient norm; the update was skipped) and flags spikes.

    ``max_bad_steps`` consecutive bad steps are tolerated; one more raises :class:`Diverged`.
    A loss above ``spike_factor`` times the median of the last ``window`` finite losses (once
    ``min_history`` are known) is a spike; ``spike_factor=0`` turns spike detection off.
    """

    def __init__(self, max_bad_steps: int, spike_factor: float, window: int = 32, min_history: int = 8):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.min_history = min_history
        self.recent: deque[float] = deque(maxlen=window)
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.empty_total = 0  # steps without a trained token (skipped, not bad)

    def check(self, step: int, result: StepResult) -> tuple[dict, str | None]:
        """Fields to add to the step's metrics record and a line for the log (None: nothing to say);
        raises :class:`Diverged` past the limit."""
        if result.empty:
            self.empty_total += 1
            return {"skipped_empty": self.empty_total}, (
                f"step {step}: the global batch holds no trained token (every label is masked): step skipped "
                f"({self.empty_total} so far)")
        bad = nonfinite_parts(result)
        if bad:
            self.bad_in_a_row += 1
            self.bad_total += 1
            what = " and ".join(bad)
            if self.bad_in_a_row > self.max_bad_steps:
                raise Diverged(f"step {step}: non-finite {what}; {self.bad_in_a_row} bad steps in a row exceed "
                               f"trainer.max_bad_steps={self.max_bad_steps}. Resume from an earlier checkpoint "
                               "with a lower optim.lr or a tighter optim.grad_clip")
            return {"skipped": True, "bad_steps": self.bad_total}, (
                f"step {step}: non-finite {what}: update skipped on every rank ({self.bad_in_a_row} in a row, "
                f"{self.bad_total} in this run; trainer.max_bad_steps={self.max_bad_steps})")
        self.bad_in_a_row = 0
        return self.spike(step, result.loss)

    def spike(self, step: int, loss: float) -> tuple[dict, str | None]:
        out, note = {}, None
        if self.spike_factor > 0 and len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.spike_factor * median:
                out["loss_spike"] = {"median": median, "ratio": loss / median}
                note = f"step {step}: loss spike: {loss:.4g} is {loss / median:.1f}x the running median {median:.4g}"
        self.recent.append(loss)
        return out, note
