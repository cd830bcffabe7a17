"""Attention-work balance of the cp layouts over document-length mixes, from the plans alone.

For each mix, sample length and cp: the max/mean visible causal pairs per rank (1.0 = perfect),
worst over the samples of the mix, for zigzag, contiguous and balanced. Pure arithmetic: no
processes, no attention. ``python -m tools.bench_balance [--samples N]``.

Mixes: ``stdlib`` (the embedded corpus's documents packed in order; lengths in tokens estimated
as bytes / 4, see docs/benchmarks.md), ``lognormal`` (median 1K, tail capped at 256K), ``one``
(one document per sample), ``512`` (all documents of 512 tokens).
"""

from __future__ import annotations

import argparse

import numpy as np

from megaring.layout import balanced_ranges, pair_work, shard_ranges


def rank_work(lengths, ranges) -> int:
    """Visible causal pairs of the queries in ``ranges`` (global), documents of ``lengths``."""
    starts = np.cumsum([0, *lengths])
    total = 0
    for a, b in ranges:
        i = int(np.searchsorted(starts, a, side="right")) - 1
        while a < b:
            e = min(b, int(starts[i + 1]))
            total += pair_work(a - int(starts[i]), e - int(starts[i]))
            a, i = e, i + 1
    return total


def imbalance(lengths, cp: int, layout: str) -> float:
    s = sum(lengths)
    if layout == "balanced":
        plans = balanced_ranges(lengths, cp)
    else:
        plans = [shard_ranges(s, r, cp, layout) for r in range(cp)]
    works = [rank_work(lengths, p) for p in plans]
    return max(works) / (sum(works) / cp)


def stream(mix: str, total: int, seed: int = 0) -> list[int]:
    """Document lengths of a token stream of at least ``total`` tokens."""
    rng = np.random.default_rng(seed)
    if mix == "stdlib":
        from megaring.data.stdlib_corpus import stdlib_sources

        lengths = [max(1, sum(p.stat().st_size for p in repo.files) // 4) for repo in stdlib_sources()]
        while sum(lengths) < total:
            lengths += lengths
        return lengths
    if mix == "lognormal":
        out = []
        while sum(out) < total:
            out.append(int(min(256 * 1024, max(1, rng.lognormal(np.log(1024), 1.5)))))
        return out
    if mix == "512":
        return [512] * (total // 512 + 1)
    return [total]


def samples(lengths: list[int], seq: int, n: int) -> list[list[int]]:
    """The first ``n`` samples of ``seq`` tokens of the packed stream, as document-piece lengths."""
    starts = np.cumsum([0, *lengths])
    out = []
    for k in range(n):
        t0, t1 = k * seq, (k + 1) * seq
        if t1 > starts[-1]:
            break
        edges = [t0, *(int(x) for x in starts if t0 < x < t1), t1]
        out.append([b - a for a, b in zip(edges[:-1], edges[1:])])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    print("| mix | tokens | cp | zigzag | contiguous | balanced |")
    print("|---|---|---|---|---|---|")
    for mix in ("stdlib", "lognormal", "one", "512"):
        for seq in (1 << 16, 1 << 20):
            n = 1 if mix == "one" else args.samples
            docs = samples(stream(mix, seq * n), seq, n) if mix != "one" else [[seq]]
            for cp in (2, 4, 8, 16):
                row = [max(imbalance(d, cp, layout) for d in docs) for layout in ("zigzag", "contiguous", "balanced")]
                print(f"| {mix} | {seq // 1024}K | {cp} | " + " | ".join(f"{x:.3f}" for x in row) + " |")


if __name__ == "__main__":
    main()
