"""The layouts that fit: every (dp, cp, tp, zero stage, checkpointing, chunks) for a device count, best first."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megaring.layout import length_problem
from megaring.model.config import ModelConfig, validate_model_config
from megaring.plan.memory import Estimate, Hardware, Layout, estimate

LOSS_CHUNK, MLP_CHUNK = 4096, 8192  # the chunks the planner proposes (tokens)


@dataclass(frozen=True)
class Plan:
    fits: list[Estimate]  # best first: fastest step, then lowest peak
    smallest: Estimate | None  # the lowest-peak valid layout (what a config that fits nowhere would need)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: ModelConfig, seq_len: int, devices: int) -> list[Layout]:
    out = []
    for tp in _divisors(devices):
        for cp in _divisors(devices // tp):
            dp = devices // (tp * cp)
            if validate_model_config(cfg, tp=tp, cp=cp, seq_len=seq_len, sequence_parallel=tp > 1):
                continue
            if length_problem(seq_len, cp, "zigzag") is not None:
                continue
            for stage in (1, 2, 3):
                for ac in (False, True):
                    for chunks in ((0, 0), (LOSS_CHUNK, MLP_CHUNK)):
                        out.append(Layout(dp, cp, tp, stage, tp > 1, ac, *chunks))
    return out


def plan(cfg: ModelConfig, seq_len: int, micro_batch: int, devices: int, hw: Hardware) -> Plan:
    estimates = [estimate(cfg, seq_len, micro_batch, lay, hw) for lay in candidate_layouts(cfg, seq_len, devices)]
    budget = hw.memory_bytes - hw.reserved_bytes
    fits = sorted((e for e in estimates if e.peak <= budget), key=lambda e: (e.step_s, e.peak))
    smallest = min(estimates, key=lambda e: e.peak, default=None)
    return Plan(fits, smallest)


def longest_seq_len(cfg: ModelConfig, lay: Layout, hw: Hardware, micro_batch: int = 1, quantum: int = 1024) -> int:
    """The longest sequence (a multiple of ``quantum * 2 cp``) whose step fits ``hw`` at ``lay``; 0 if none."""
    step = quantum * 2 * lay.cp
    fits = lambda n: estimate(cfg, n * step, micro_batch, lay, hw).peak <= hw.memory_bytes - hw.reserved_bytes  # noqa: E731
    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def describe(p: Plan, hw: Hardware, top: int = 10) -> str:
    if not p.fits:
        if p.smallest is None:
            return "no valid layout for this model, sequence length and device count"
        need = math.ceil((p.smallest.peak + hw.reserved_bytes) / 2**30)
        return (f"fits nowhere in {gib(hw.memory_bytes)} per device: the smallest layout "
                f"({_row(p.smallest)}) needs {need} GiB per device")
    lines = [f"{len(p.fits)} layouts fit in {gib(hw.memory_bytes)}; best first:"]
    lines += [_row(e) for e in p.fits[:top]]
    return "\n".join(lines)


def _row(e: Estimate) -> str:
    lay = e.layout
    return (f"dp={lay.dp} cp={lay.cp} tp={lay.tp} zero={lay.zero_stage} sp={lay.sequence_parallel} "
            f"ac={lay.activation_checkpointing} loss_chunk={lay.loss_chunk} mlp_chunk={lay.mlp_chunk}: "
            f"peak {gib(e.peak)} (states {gib(e.states)}, saved {gib(e.saved)}, transient {gib(e.transient)}, "
            f"of the gradients {gib(e.live_grads)} at the activation peak), "
            f"step {e.step_s:.3f} s")
