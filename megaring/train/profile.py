"""``trainer.profile_steps=[a, b]``: a ``torch.profiler`` trace of steps a..b, and a CUDA memory snapshot.

Writes into ``<run dir>/profile/``: ``trace_rank<r>.json`` (Chrome trace: open in
https://ui.perfetto.dev or chrome://tracing; ring attention appears as ``ring_attention.forward`` /
``ring_attention.backward`` with ``ring.comm.send_recv`` / ``ring.comm.wait`` inside) and, on CUDA,
``memory_rank<r>.pickle`` (open in https://pytorch.org/memory_viz). ``StepProfiler.around(step)``
wraps one step; it does nothing outside the range (or without ``profile_steps``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Profiles the steps ``first..last`` (inclusive) of this rank into ``directory``."""

    def __init__(self, steps: list[int] | None, directory: Path, rank: int, device: torch.device):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.directory, self.rank, self.cuda = Path(directory), rank, device.type == "cuda"
        self.prof: profile | None = None

    @contextlib.contextmanager
    def around(self, step: int):
        if not self.first <= step <= self.last:
            yield
            return
        if step == self.first:
            self._start()
        try:
            yield
        finally:
            if step == self.last:
                self._stop()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.prof.__enter__()

    def _stop(self) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.directory / f"trace_rank{self.rank}.json"))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.directory / f"memory_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.prof = None


def profile_steps_problems(steps: list[int] | None) -> list[str]:
    if steps is None:
        return []
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        return [f"trainer.profile_steps={list(steps)} must be [first, last] with 1 <= first <= last"]
    return []
