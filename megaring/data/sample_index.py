"""Which token range makes each sample of a split, and in which order samples are visited.

Packing: a split is a contiguous run of documents ``[d0, d1)``, so its tokens are one stream
``[base, end)`` of the store. Sample ``i`` is tokens ``[base + i*L, base + i*L + L + 1)``
(``L = seq_len``; the extra token is the label of the last position), so a document longer
than a sample simply continues in the next one, and there are ``(end - base - 1) // L``
samples. The tail that does not fill a sample is dropped.

Order: epoch 0 visits the samples in the permutation drawn from ``default_rng([seed, 0])``;
epoch ``e > 0`` permutes that order again with ``default_rng([seed, e])``. Sample ordinal
``k`` (the k-th sample consumed by training) is sample ``k % n`` of epoch ``k // n``.

The index is an ``(n, 2)`` int64 array of ``(start_doc, start_token)`` in epoch-0 order,
built once with ``np.searchsorted`` over the document offsets and cached as ``.npy`` next to
the data, so startup only memory-maps it.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import numpy as np


def split_documents(num_docs: int, split: str, valid_fraction: float) -> tuple[int, int]:
    """Document range ``[d0, d1)`` of ``split``: "valid" is the last ``valid_fraction`` (at least one)."""
    n_valid = 0 if valid_fraction <= 0 else min(num_docs, max(1, round(num_docs * valid_fraction)))
    if split == "train":
        return 0, num_docs - n_valid
    if split == "valid":
        return num_docs - n_valid, num_docs
    raise ValueError(f"unknown split {split!r} (train | valid)")


def pack_samples(doc_starts: np.ndarray, d0: int, d1: int, seq_len: int) -> np.ndarray:
    """``(n, 2)`` int64 rows ``(start_doc, start_token)`` of the split's samples, in index order."""
    base, end = int(doc_starts[d0]), int(doc_starts[d1])
    n = max(0, (end - base - 1) // seq_len)
    starts = base + np.arange(n, dtype=np.int64) * seq_len  # (n,)
    first_doc = np.searchsorted(doc_starts, starts, side="right") - 1  # (n,) document holding each start
    return np.stack([first_doc, starts], axis=1).astype(np.int64)


def build_index(doc_starts: np.ndarray, d0: int, d1: int, seq_len: int, seed: int) -> np.ndarray:
    """``(n, 2)`` int64 rows ``(start_doc, start_token)`` of the split's samples, in epoch-0 order."""
    rows = pack_samples(doc_starts, d0, d1, seq_len)
    return rows[np.random.default_rng([seed, 0]).permutation(rows.shape[0])]


class SampleIndex:
    """Maps a sample ordinal (samples consumed so far) to ``(start_doc, start_token)``."""

    def __init__(self, rows: np.ndarray, seed: int):
        self.rows = rows  # (n, 2) int64, epoch-0 order
        self.seed = seed
        self._epoch, self._perm = 0, None

    @property
    def num_samples(self) -> int:
        return self.rows.shape[0]

    def locate(self, ordinal: int) -> tuple[int, int]:
        """``(start_doc, start_token)`` of the ``ordinal``-th sample consumed."""
        if ordinal < 0:
            raise IndexError(f"sample ordinal {ordinal} is negative")
        epoch, i = divmod(ordinal, self.num_samples)
        if epoch > 0:
            i = int(self._epoch_permutation(epoch)[i])
        start_doc, start_token = self.rows[i]
        return int(start_doc), int(start_token)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch or self._perm is None:  # one epoch memoized: reads move forward
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perm


def load_sample_index(doc_starts: np.ndarray, *, d0: int, d1: int, seq_len: int, seed: int,
                      cache_path: Path | None) -> SampleIndex:
    """The split's index, from ``cache_path`` when it is there, else built (and cached when possible)."""
    n_expected = max(0, (int(doc_starts[d1]) - int(doc_starts[d0]) - 1) // seq_len)
    if cache_path is not None and cache_path.is_file():
        try:
            rows = np.load(cache_path, mmap_mode="r")
            if rows.shape == (n_expected, 2) and rows.dtype == np.int64:
                return SampleIndex(rows, seed)
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it below
    rows = build_index(doc_starts, d0, d1, seq_len, seed)
    if cache_path is not None:
        _save_atomic(rows, cache_path)
    return SampleIndex(rows, seed)


def _save_atomic(rows: np.ndarray, path: Path) -> None:
    """Write ``rows`` to ``path`` via a rename, so concurrent ranks never read half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique across hosts and ranks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, rows)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"cannot cache the sample index at {path} ({e}); it stays in memory", stacklevel=2)
        tmp.unlink(missing_ok=True)
