"""The mixture reader's costs: index build for 3 large stores, and a step's reads against one store.

Writes three stores of ``--docs`` documents each (8-64 tokens, so a sample spans many documents),
then times (1) building the mixture's three sample indexes from scratch (cold: no cached ``.npy``)
and the schedule's count of ``--resume-step`` steps (what a resume pays), and (2) reading a step
(``reader.micro_batches``, one rank of cp=2, ``G`` samples of ``--seq-len``) from the mixture
against one of its stores alone, alternating over rounds: median per-step time of each and the
median ratio mixture / one store.

    python -m tools.bench_mixture --docs 1000000 --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from megaring.data import BatchShape, DataConfig, RankShard, build_batch_reader, write_tokenized
from tools.rounds import median_ratio


def write_store(path: Path, n_docs: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 65, n_docs)
    stream = rng.integers(0, 30_000, int(lengths.sum()))
    ends = np.cumsum(lengths)
    stream[ends - 1] = 30_000  # end of document
    docs = np.split(stream, ends[:-1])
    write_tokenized(path, docs, vocab_size=30_001, eod_id=30_000)
    return path


def step_seconds(reader, first_step: int, steps: int) -> float:
    began = time.perf_counter()
    for s in range(first_step, first_step + steps):
        reader.micro_batches(s)
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resume-step", type=int, default=100_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        began = time.perf_counter()
        paths = {name: write_store(tmp / name, args.docs, seed) for seed, name in enumerate(("books", "code", "web"))}
        print(f"wrote 3 stores of {args.docs:,} documents in {time.perf_counter() - began:.1f} s")
        sources = {name: {"path": str(p), "weight": w} for (name, p), w in zip(paths.items(), (0.4, 0.35, 0.25))}
        mixture = DataConfig(kind="mixture", sources=sources)
        one = DataConfig(kind="files", path=str(paths["books"]))
        shape, shard = BatchShape(args.seq_len, args.global_batch, 1), RankShard(0, 1, 0, 2, "zigzag")
        began = time.perf_counter()
        mix_reader = build_batch_reader(mixture, shape, shard, seed=0)
        build_s = time.perf_counter() - began
        began = time.perf_counter()
        mix_reader.mixture.schedule.counts_before(args.resume_step * args.global_batch)
        resume_s = time.perf_counter() - began
        mix_reader.mixture.schedule.counts_before(0)
        print(f"index build, 3 stores, cold: {build_s:.2f} s; schedule count to step {args.resume_step:,}: "
              f"{resume_s:.2f} s")
        one_reader = build_batch_reader(one, shape, shard, seed=0)
        pairs = []
        for r in range(args.rounds):
            first = r * args.steps
            t_one = step_seconds(one_reader, first, args.steps)
            t_mix = step_seconds(mix_reader, first, args.steps)
            pairs.append((t_mix, t_one))
            print(f"| {r + 1} | {t_one * 1e3:.2f} | {t_mix * 1e3:.2f} | {t_mix / t_one:.3f} |", flush=True)
        one_ms, mix_ms = (statistics.median(p[i] for p in pairs) * 1e3 for i in (1, 0))
        print(f"median ms per step: one store {one_ms:.2f}, mixture {mix_ms:.2f}; "
              f"median ratio mixture / one: {median_ratio(pairs):.3f}")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
