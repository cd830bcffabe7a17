"""Side-by-side measurement for the benchmarks: timed repeats and medians of paired ratios.

These machines are shared and noisy, so a benchmark alternates the things it compares (one
round each, in turn) and reports the median over rounds of the ratio within a round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable


def time_calls(step: Callable[[], object], *, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def median_ratio(pairs: Iterable[tuple[float, float]]) -> float:
    """Median over rounds of ``a / b`` for each round's ``(a, b)``."""
    return statistics.median(a / b for a, b in pairs)
