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

from megaring.data.doc_mixes import pack_samples, stream
from megaring.layout import balanced_ranges, ranges_work, shard_ranges


def imbalance(lengths, cp: int, layout: str) -> float:
    s = sum(lengths)
    if layout == "balanced":
        plans = balanced_ranges(lengths, cp)
    else:
        plans = [shard_ranges(s, r, cp, layout) for r in range(cp)]
    works = [ranges_work(lengths, p) for p in plans]
    return max(works) / (sum(works) / cp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    print("| mix | tokens | cp | zigzag | contiguous | balanced |")
    print("|---|---|---|---|---|---|")
    for mix in ("stdlib", "lognormal", "one", "512"):
        for seq in (1 << 16, 1 << 20):
            n = 1 if mix == "one" else args.samples
            docs = pack_samples(stream(mix, seq * n), seq, n) if mix != "one" else [[seq]]
            for cp in (2, 4, 8, 16):
                row = [max(imbalance(d, cp, layout) for d in docs) for layout in ("zigzag", "contiguous", "balanced")]
                print(f"| {mix} | {seq // 1024}K | {cp} | " + " | ".join(f"{x:.3f}" for x in row) + " |")


if __name__ == "__main__":
    main()
