"""Document-length mixes of packed samples, shared by the balance benchmarks and the tests.

A *stream* is the document lengths of a packed token stream; :func:`pack_samples` cuts it into
samples of ``seq`` tokens (documents crossing a sample edge are cut there, as the sample index
does). Mixes (see docs/benchmarks.md, "Packed documents over cp"):

- ``stdlib``: the embedded stdlib corpus's documents in order, lengths estimated as bytes / 4;
- ``lognormal``: median 1K tokens, sigma 1.5, the tail capped (256K by default);
- ``512``: every document 512 tokens; ``one``: one document per sample;
- edge cases for the tests: ``tiny`` (1-3 tokens each), ``huge`` (3/4 of the stream, then tiny
  ones), ``awkward`` (prime lengths), ``short`` (3 tokens each).
"""

from __future__ import annotations

import numpy as np
import torch

MIXES = ("stdlib", "lognormal", "one", "512", "tiny", "huge", "awkward", "short")


def lognormal_lengths(total: int, seed: int = 0, cap: int = 256 * 1024) -> list[int]:
    """Lengths (median 1024, sigma 1.5, in ``[1, cap]``) of a stream of at least ``total`` tokens."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(int(min(cap, max(1, rng.lognormal(np.log(1024), 1.5)))))
    return out


def stream(mix: str, total: int, seed: int = 0) -> list[int]:
    """Document lengths of a ``mix`` stream of at least ``total`` tokens."""
    if mix == "stdlib":
        from megaring.data.stdlib_corpus import stdlib_sources

        lengths = [max(1, sum(p.stat().st_size for p in repo.files) // 4) for repo in stdlib_sources()]
        while sum(lengths) < total:
            lengths += lengths
        return lengths
    if mix == "lognormal":
        return lognormal_lengths(total, seed)
    if mix == "512":
        return [512] * (total // 512 + 1)
    if mix == "one":
        return [total]
    rng = np.random.default_rng(seed)
    if mix == "tiny":
        return rng.integers(1, 4, total).tolist()
    if mix == "huge":
        return [total * 3 // 4, *rng.integers(1, 5, total).tolist()]
    if mix == "awkward":
        return [7, 13, 29, 3, 31, 11, 17] * (total // 111 + 1)
    if mix == "short":
        return [3] * (total // 3 + 1)
    raise ValueError(f"unknown document mix {mix!r}; choose one of {MIXES}")


def pack_samples(lengths: list[int], seq: int, n: int) -> list[list[int]]:
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


def segment_ids(lengths: list[int]) -> torch.Tensor:
    """``(sum(lengths),)`` int64 ids: document i's tokens carry i."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def sample_segment_ids(mix: str, seq: int, seed: int = 0) -> torch.Tensor:
    """``(seq,)`` segment ids of the first packed sample of a ``mix`` stream."""
    return segment_ids(pack_samples(stream(mix, seq, seed), seq, 1)[0])
