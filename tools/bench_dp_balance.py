"""Work balance over dp ranks: ``data.balance=none`` (in order) against ``work`` (by attention cost).

Part 1, from the plans alone (no processes): a lognormal document mix (median 1K tokens, sigma
1.5, tail capped at 256K) packed into samples of ``--seq-len`` tokens in a shuffled order, as the
sample index visits them; each step takes ``G = dp * --per-rank`` samples; ``work_dp_imbalance``
(max over dp ranks of the step's visible causal pairs over the mean) for each plan, median and
worst over ``--steps`` steps, at dp = 2, 4, 8.

Part 2, time: every sample of ``--time-steps`` steps at dp = ``--time-dp`` is run once through
mask-aware attention on this process (forward + backward, the balanced layout's kernel path, whose
work follows the visible pairs), and each plan's busiest rank is charged the sum of its samples'
measured times (median of ``--repeats`` per sample): both plans from the same timings, side by side.

``python -m tools.bench_dp_balance [--seq-len 8192] [--steps 50] [--time-steps 4]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from megaring.data.balance import piece_pairs, plan_step
from megaring.data.doc_mixes import pack_samples, stream


def sample_pieces(seq_len: int, n: int, seed: int) -> list[list[int]]:
    """``n`` packed samples' document-piece lengths, in a shuffled order."""
    pieces = pack_samples(stream("lognormal", seq_len * n, seed), seq_len, n)
    order = np.random.default_rng([seed, 0]).permutation(len(pieces))
    return [pieces[i] for i in order]


def imbalance_table(pieces: list[list[int]], per_rank: int, steps: int) -> list[str]:
    costs = np.array([int(piece_pairs(np.array(p), None).sum()) for p in pieces], dtype=np.int64)
    rows = []
    for dp in (2, 4, 8):
        g = dp * per_rank
        got = {b: [plan_step(b, costs[s * g:(s + 1) * g], dp, 1).dp_imbalance for s in range(steps)]
               for b in ("none", "work")}
        rows.append(f"| {dp} | {g} | " + " | ".join(f"{statistics.median(got[b]):.3f} / {max(got[b]):.3f}"
                                                      for b in ("none", "work")) + " |")
    return rows


def attention_time(lengths: list[int], heads: int, head_dim: int) -> float:
    """Seconds of one forward + backward of mask-aware attention over one sample."""
    from megaring.distributed.mesh import Axis
    from megaring.ring.attention import ring_attention

    s = sum(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]  # (1, S)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, S)
    q, k, v = (torch.randn(1, s, heads, head_dim, requires_grad=True) for _ in range(3))  # (1, S, H, D)
    began = time.perf_counter()
    out = ring_attention(q, k, v, group=Axis.single("cp"), segment_ids=seg, positions=pos, layout="balanced")
    out.sum().backward()
    return time.perf_counter() - began


def time_table(pieces: list[list[int]], dp: int, per_rank: int, steps: int, heads: int, head_dim: int,
               repeats: int) -> list[str]:
    g = dp * per_rank
    pieces = pieces[:g * steps]
    attention_time(pieces[0], heads, head_dim)  # warm-up
    seconds = np.array([statistics.median(attention_time(p, heads, head_dim) for _ in range(repeats))
                        for p in pieces])  # (G * steps,) median of repeats per sample
    costs = np.array([int(piece_pairs(np.array(p), None).sum()) for p in pieces], dtype=np.int64)
    busiest = {"none": [], "work": []}
    for s in range(steps):
        for b in busiest:
            plan = plan_step(b, costs[s * g:(s + 1) * g], dp, 1)
            per_rank_s = seconds[s * g:(s + 1) * g][plan.slots].reshape(dp, -1).sum(axis=1)
            busiest[b].append(float(per_rank_s.max()))
    ratios = [w / n for w, n in zip(busiest["work"], busiest["none"])]
    return [f"| {s + 1} | {n:.2f} | {w:.2f} | {r:.3f} |"
            for s, (n, w, r) in enumerate(zip(busiest["none"], busiest["work"], ratios))] + [
        f"| median | {statistics.median(busiest['none']):.2f} | {statistics.median(busiest['work']):.2f} | "
        f"{statistics.median(ratios):.3f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--per-rank", type=int, default=8, help="samples per dp rank and step")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--time-dp", type=int, default=4)
    parser.add_argument("--time-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timings per sample (median)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    pieces = sample_pieces(args.seq_len, 8 * args.per_rank * args.steps, args.seed)
    print(f"work_dp_imbalance over {args.steps} steps, {args.seq_len}-token samples, {args.per_rank} per rank:")
    print("| dp | samples per step | none: median / worst | work: median / worst |")
    print("|---|---|---|---|")
    print("\n".join(imbalance_table(pieces, args.per_rank, args.steps)))
    print(f"\nbusiest rank's attention fwd+bwd per step (s), dp={args.time_dp}, heads {args.heads} x {args.head_dim}:")
    print("| step | none | work | work / none |")
    print("|---|---|---|---|")
    print("\n".join(time_table(pieces, args.time_dp, args.per_rank, args.time_steps, args.heads, args.head_dim,
                                args.repeats)))


if __name__ == "__main__":
    main()
