"""Cost model for factoring cp into Ulysses x ring: bytes sent and attention time per rank.

For one attention call (forward + backward) of ``batch`` sequences of ``seq_len`` tokens, ``n_heads``
/ ``n_kv_heads`` heads of ``head_dim`` split over tp, on a cp axis of ``cp = ulysses * ring`` ranks
(Ulysses innermost, tp inside it, as :mod:`megaring.distributed.mesh` lays them out), with
``S_l = seq_len / cp`` tokens per rank, ``H, H_kv`` heads per tp rank, ``e`` bytes per element:

Ulysses all-to-all (``U > 1``), a rank sends ``(U-1)/U`` of each buffer:
    forward   q, k, v   ``B S_l (H + 2 H_kv') D e``  (``H_kv' = H_kv``, or ``U`` when kv heads are replicated)
              output    ``B S_l H D e``;  segment ids ``B S_l 8 (U-1)`` (int64, one copy per peer)
    backward  the adjoints: the output's gradient, then dq, dk, dv: the same bytes again.
Ring (``R > 1``) on the gathered ``L = S / R`` tokens with ``h_kv`` kv heads per rank after the all-to-all:
    forward   ``R-1`` K/V blocks ``2 B L h_kv D e`` (+ segment ids ``B L 8``)
    backward  (``whole``) ``R-1`` K/V blocks again (+ segment ids) and ``R`` float32 dK/dV
              accumulators ``2 B L h_kv D 4``.

These are exactly what the communication layer counts (``Axis.traffic``); tests/dist check it.

Time: the kernels do ``flops = 2 B S^2 H D / cp`` per rank forward (causal; twice without the mask),
2.5x that backward, at ``kernel_tflops``. The all-to-alls are not overlapped; each of their bytes
goes over NVLink-class links to peers inside the node and over the network to the others. A ring
step takes ``max(compute, transfer)`` (the next block is in flight while this one is computed); a
ring with a hop across nodes runs at the network's speed. Each message pays ``latency_us``.

The command line is ``python -m tools.plan_cp`` (docs/benchmarks.md); ``megaring-plan`` sizes the whole
step (:mod:`megaring.plan.memory`), this module the attention axis inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaring.plan.memory import Hardware
from megaring.ulysses.heads import head_problems, kv_heads_per_rank

SEG_BYTES = 8  # int64 segment ids
GRAD_BYTES = 4  # the ring's dK/dV accumulators are float32


@dataclass(frozen=True)
class Workload:
    """One attention call: shapes per tp rank and what travels."""

    seq_len: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    batch: int = 1
    tp: int = 1
    dtype_bytes: int = 2
    causal: bool = True
    segment_ids: bool = False

    @property
    def heads(self) -> tuple[int, int]:
        return self.n_heads // self.tp, self.n_kv_heads // self.tp


@dataclass(frozen=True)
class Prediction:
    ulysses: int
    ring: int
    a2a_bytes: int  # per rank, forward + backward
    ring_bytes: int
    compute_s: float
    a2a_s: float
    ring_s: float  # ring forward + backward including the compute it overlaps
    problems: tuple[str, ...] = ()

    @property
    def time_s(self) -> float:
        return self.a2a_s + self.ring_s

    @property
    def bytes(self) -> int:
        return self.a2a_bytes + self.ring_bytes


def a2a_bytes(w: Workload, cp: int, ulysses: int) -> int:
    """Bytes one rank sends in the all-to-alls of one forward + backward."""
    if ulysses == 1:
        return 0
    h, h_kv = w.heads
    kv_sent = h_kv if h_kv % ulysses == 0 else ulysses
    s_l = w.seq_len // cp
    qkv = w.batch * s_l * (h + 2 * kv_sent) * w.head_dim * w.dtype_bytes
    out = w.batch * s_l * h * w.head_dim * w.dtype_bytes
    seg = w.batch * s_l * SEG_BYTES * (ulysses - 1) if w.segment_ids else 0
    return 2 * (qkv + out) * (ulysses - 1) // ulysses + seg


def ring_bytes(w: Workload, cp: int, ulysses: int) -> int:
    """Bytes one rank sends around the ring in one forward + (whole) backward."""
    ring = cp // ulysses
    if ring == 1:
        return 0
    h_kv = kv_heads_per_rank(w.heads[1], ulysses)
    tokens = w.batch * w.seq_len // ring
    kv = 2 * tokens * h_kv * w.head_dim * w.dtype_bytes
    seg = tokens * SEG_BYTES if w.segment_ids else 0
    grads = 2 * tokens * h_kv * w.head_dim * GRAD_BYTES
    return 2 * (ring - 1) * (kv + seg) + ring * grads


def _spread(group: int, stride: int, gpus_per_node: int) -> float:
    """Fraction of a rank's peers in a group of ``group`` ranks ``stride`` apart that sit on other nodes."""
    if group == 1:
        return 0.0
    in_node = max(1, min(group, gpus_per_node // stride))
    return (group - in_node) / (group - 1)


def predict(w: Workload, c: Hardware, cp: int, ulysses: int) -> Prediction:
    ring = cp // ulysses
    h, h_kv = w.heads
    problems = tuple(head_problems(h, h_kv, ulysses, where="per-tp-rank")) if cp % ulysses == 0 else (
        f"ulysses={ulysses} does not divide cp={cp}",)
    fwd_flops = 2 * w.batch * w.seq_len**2 * h * w.head_dim / cp * (1 if w.causal else 2)
    fwd_s, bwd_s = fwd_flops / (c.tflops * 1e12), 2.5 * fwd_flops / (c.tflops * 1e12)
    lat = c.latency_us * 1e-6
    a2a = a2a_bytes(w, cp, ulysses)
    inter = _spread(ulysses, w.tp, c.gpus_per_node)
    a2a_s = max(a2a * (1 - inter) / (c.intra_gbps * 1e9), a2a * inter / (c.inter_gbps * 1e9))
    a2a_s += (4 * lat if ulysses > 1 else 0.0)
    if ring == 1:
        ring_s = fwd_s + bwd_s
    else:
        bw = (c.inter_gbps if cp * w.tp > c.gpus_per_node else c.intra_gbps) * 1e9
        total = ring_bytes(w, cp, ulysses)
        tokens = w.batch * w.seq_len // ring
        kv = 2 * tokens * kv_heads_per_rank(h_kv, ulysses) * w.head_dim * w.dtype_bytes
        fwd_step = kv / bw + lat
        bwd_step = (total - (ring - 1) * kv) / ring / bw + lat
        ring_s = (ring - 1) * max(fwd_s / ring, fwd_step) + fwd_s / ring
        ring_s += ring * max(bwd_s / ring, bwd_step)
    return Prediction(ulysses, ring, a2a, ring_bytes(w, cp, ulysses), fwd_s + bwd_s, a2a_s, ring_s, problems)


def plan(w: Workload, c: Hardware, cp: int) -> list[Prediction]:
    """Every factorisation of cp, best (feasible, fastest) first."""
    preds = [predict(w, c, cp, u) for u in range(1, cp + 1) if cp % u == 0]
    return sorted(preds, key=lambda p: (bool(p.problems), p.time_s))


def describe(preds: list[Prediction]) -> str:
    lines = [f"{'ulysses x ring':>15} {'time/call ms':>13} {'compute ms':>11} {'a2a ms':>8} {'ring ms':>8} "
             f"{'a2a MiB':>9} {'ring MiB':>9}"]
    for p in preds:
        note = "  (not possible: " + "; ".join(p.problems) + ")" if p.problems else ""
        lines.append(f"{p.ulysses:>7} x {p.ring:<5} {p.time_s * 1e3:>13.2f} {p.compute_s * 1e3:>11.2f} "
                     f"{p.a2a_s * 1e3:>8.2f} {p.ring_s * 1e3:>8.2f} {p.a2a_bytes / 2**20:>9.1f} "
                     f"{p.ring_bytes / 2**20:>9.1f}{note}")
    return "\n".join(lines)
