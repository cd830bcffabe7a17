"""Weighted mixtures of token stores: ``data.kind=mixture`` with ``data.sources``.

``data.sources`` names stores written by ``megaring-preprocess`` with the same tokenizer, each
with a ``weight`` (any positive numbers; shares are weight / sum) and optionally
``valid_fraction`` (its validation tail, as ``data.valid_fraction`` for one store) and
``max_epochs`` (the run may not take more than this many passes over the source).

Schedule. Sample ordinal ``k`` of the run (step ``s`` takes ordinals ``[s*G, (s+1)*G)``, as for
one store) comes from the source whose share interval of ``[0, 1)`` holds
``u_k = frac(offset + k * phi)``, ``phi = (sqrt(5) - 1) / 2`` and ``offset`` drawn from the seed:
a low-discrepancy (Kronecker) sequence, so over any window of ``N`` consecutive ordinals each
source's count is within a few samples of ``N * share`` (three-gap theorem), deterministically,
not by independent coin flips. The ``j``-th sample taken from a source is its own ordinal ``j``:
the source's shuffled order and epochs (:mod:`megaring.data.sample_index`, seed
``[trainer.seed, crc32(name)]``). Everything is a function of (seed, weights, G, step): the mesh
does not enter, a resume on any layout reads the same samples, and the data state is still the
consumed count (each source's count is recomputed from it: :meth:`MixtureSchedule.counts_before`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

PHI = (math.sqrt(5.0) - 1.0) / 2.0
SOURCE_KEYS = ("path", "weight", "valid_fraction", "max_epochs", "min_doc_tokens", "max_doc_tokens")


@dataclass(frozen=True)
class SourceSpec:
    """One named source of ``data.sources``."""

    name: str
    path: str
    weight: float
    valid_fraction: float = 0.0
    max_epochs: float | None = None
    min_doc_tokens: int = 0  # keep documents of at least this many tokens (0: no bound) ...
    max_doc_tokens: int = 0  # ... and at most this many (0: no bound): LengthFilter

    @property
    def filtered(self) -> bool:
        return bool(self.min_doc_tokens or self.max_doc_tokens)

    @property
    def seed_salt(self) -> int:
        """What makes this source's sample order its own (with ``trainer.seed``)."""
        return zlib.crc32(self.name.encode())


def source_problems(sources) -> list[str]:
    """Every problem of ``data.sources`` (a mapping of names to ``{path, weight, ...}``), at once."""
    if not isinstance(sources, dict) or not sources:
        return ["data.kind=mixture needs data.sources: a mapping of names to {path: <store>, weight: <w>}"]
    out = []
    for name, spec in sources.items():
        where = f"data.sources.{name}"
        if not isinstance(spec, dict):
            out.append(f"{where} must be a mapping {{path: ..., weight: ...}}, got {spec!r}")
            continue
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown:
            out.append(f"{where}: unknown keys {unknown}; a source takes {list(SOURCE_KEYS)}")
        if not spec.get("path"):
            out.append(f"{where}.path must name a directory written by megaring-preprocess")
        weight = spec.get("weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0 or \
                not math.isfinite(weight):
            out.append(f"{where}.weight must be a positive number, got {weight!r}")
        fraction = spec.get("valid_fraction", 0.0)
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            out.append(f"{where}.valid_fraction must be in [0, 1), got {fraction!r}")
        bounds = [spec.get(k, 0) for k in ("min_doc_tokens", "max_doc_tokens")]
        for key, value in zip(("min_doc_tokens", "max_doc_tokens"), bounds):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                out.append(f"{where}.{key} must be an integer >= 0 (0: no bound), got {value!r}")
        if all(isinstance(b, int) and b > 0 for b in bounds) and bounds[0] > bounds[1]:
            out.append(f"{where}: min_doc_tokens={bounds[0]} is above max_doc_tokens={bounds[1]}")
        epochs = spec.get("max_epochs")
        if epochs is not None and (not isinstance(epochs, (int, float)) or not epochs > 0):
            out.append(f"{where}.max_epochs must be a positive number or null, got {epochs!r}")
    return out


def source_specs(sources: dict) -> list[SourceSpec]:
    """The sources of a valid ``data.sources``, in name order (the order of the share intervals)."""
    return [SourceSpec(name, str(spec["path"]), float(spec["weight"]), float(spec.get("valid_fraction", 0.0)),
                       None if spec.get("max_epochs") is None else float(spec["max_epochs"]),
                       int(spec.get("min_doc_tokens", 0)), int(spec.get("max_doc_tokens", 0)))
            for name, spec in sorted(sources.items())]


class LengthFilter:
    """A store seen through a document-length filter, without rewriting it (``min_doc_tokens`` /
    ``max_doc_tokens``): the kept documents back to back form the token stream the sample index
    packs, and :meth:`read` maps a range of that stream to the store's pieces. Everything else
    (vocabulary, tokenizer, identity) is the store's."""

    def __init__(self, store, min_tokens: int, max_tokens: int):
        self.inner = store  # the Dataset
        lengths = np.diff(store.doc_starts)  # (D,)
        keep = (lengths >= min_tokens) & ((lengths <= max_tokens) if max_tokens else True)
        self.kept = np.flatnonzero(keep)  # (D',) store documents, in order
        self.doc_starts = np.zeros(self.kept.size + 1, dtype=np.int64)  # (D' + 1,) in the filtered stream
        np.cumsum(lengths[self.kept], out=self.doc_starts[1:])
        self.bounds = (min_tokens, max_tokens)

    def __getattr__(self, name):  # vocab_size, eod_id, bos_id, metadata, path, store, tokenizer_files, ...
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def num_documents(self) -> int:
        return self.kept.size

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    def _pieces(self, start: int, stop: int):
        """(store start, store stop) of each piece of filtered tokens ``[start, stop)``."""
        first = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        for i in range(first, self.kept.size):
            a, b = int(self.doc_starts[i]), int(self.doc_starts[i + 1])
            if a >= stop:
                break
            base = int(self.inner.doc_starts[self.kept[i]]) - a
            yield base + max(a, start), base + min(b, stop)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([self.inner.read(a, b) for a, b in self._pieces(start, stop)])

    def read_mask(self, start: int, stop: int) -> np.ndarray | None:
        masks = [self.inner.read_mask(a, b) for a, b in self._pieces(start, stop)]
        return None if masks[0] is None else np.concatenate(masks)


class MixtureSchedule:
    """Which source each sample ordinal comes from, and its ordinal inside that source."""

    CHUNK = 1 << 20  # ordinals counted per numpy pass when catching up

    def __init__(self, weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        self.edges = np.cumsum(w) / w.sum()  # (n,) right edges of the share intervals
        self.edges[-1] = 1.0
        self.offset = float(np.random.default_rng([seed, 0x6D6978]).random())
        self._at, self._counts = 0, np.zeros(w.size, dtype=np.int64)  # counts of ordinals [0, _at)

    @property
    def num_sources(self) -> int:
        return self.edges.size

    def sources_of(self, first: int, count: int) -> np.ndarray:
        """(count,) int64 source of ordinals ``[first, first + count)``."""
        k = np.arange(first, first + count, dtype=np.float64)
        u = np.mod(self.offset + k * PHI, 1.0)
        return np.minimum(np.searchsorted(self.edges, u, side="right"), self.num_sources - 1).astype(np.int64)

    def counts_before(self, ordinal: int) -> np.ndarray:
        """(n,) how many of ordinals ``[0, ordinal)`` each source gave (memoized: reads move forward)."""
        if ordinal < self._at:
            self._at, self._counts = 0, np.zeros_like(self._counts)
        while self._at < ordinal:
            n = min(self.CHUNK, ordinal - self._at)
            self._counts = self._counts + np.bincount(self.sources_of(self._at, n), minlength=self.num_sources)
            self._at += n
        return self._counts.copy()

    def locate(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source, ordinal in source)`` of ordinals ``[first, first + count)``, each (count,) int64."""
        src = self.sources_of(first, count)
        before = self.counts_before(first)
        inside = np.zeros(count, dtype=np.int64)
        for s in range(self.num_sources):
            mine = src == s
            inside[mine] = before[s] + np.arange(int(mine.sum()), dtype=np.int64)
        return src, inside


class Mixture:
    """The sources of a mixture (opened stores and their sample indexes) and the schedule over them.

    ``locate(ordinal)`` answers from a per-step cache of ``G`` ordinals, so a step's reads (in any
    order, as ``data.balance`` deals them) cost one schedule pass.
    """

    def __init__(self, specs: list[SourceSpec], sources: list, indexes: list, global_batch_size: int, seed: int):
        self.specs, self.sources, self.indexes = specs, sources, indexes
        self.names = [s.name for s in specs]
        self.schedule = MixtureSchedule([s.weight for s in specs], seed)
        self.global_batch_size = global_batch_size
        self._step: tuple[int, np.ndarray, np.ndarray] | None = None  # (first ordinal, sources, inside)

    def step_of(self, ordinal: int) -> tuple[int, np.ndarray, np.ndarray]:
        """``(first, source, ordinal in source)`` of the step holding ``ordinal``; arrays (G,) int64."""
        first = ordinal - ordinal % self.global_batch_size
        if self._step is None or self._step[0] != first:
            self._step = (first, *self.schedule.locate(first, self.global_batch_size))
        return self._step

    def locate(self, ordinal: int) -> tuple[int, object, int, int]:
        """``(source id, source, start_doc, start_token)`` of the ``ordinal``-th sample of the run."""
        first, src, inside = self.step_of(ordinal)
        s, j = int(src[ordinal - first]), int(inside[ordinal - first])
        start_doc, start_token = self.indexes[s].locate(j)
        return s, self.sources[s], start_doc, start_token

    def step_counts(self, consumed_samples: int) -> dict[str, int]:
        """``{name: samples}`` of the step after ``consumed_samples`` (the ``source_samples`` metric)."""
        _, src, _ = self.step_of(consumed_samples)
        counts = np.bincount(src, minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts)}
