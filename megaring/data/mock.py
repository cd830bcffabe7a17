"""The mock source: deterministic documents computed on demand, with no files.

Document lengths are ``1 + Exponential(mean_doc_len - 1)`` capped at ``max_doc_len`` (at
least 2), drawn from ``mock_seed`` until they hold ``num_tokens``; with the default mean of
2048 about one document in eight is longer than a 4096-token sample. Document ``d`` is an
arithmetic progression ``(first[d] + stride[d] * k) % (vocab_size - 1)`` ending with the
end-of-document id ``vocab_size - 1``: pseudo-random, yet learnable (the next token is the
previous one plus the document's stride), which makes loss curves on mock data meaningful.
Only the per-document constants are stored; any token range is computed in O(range).
"""

from __future__ import annotations

import numpy as np

from megaring.data.config import DataConfig


class MockSource:
    """A token source (``doc_starts``, ``read``) over generated documents."""

    def __init__(self, cfg: DataConfig):
        self.vocab_size = cfg.vocab_size
        self.eod_id = cfg.vocab_size - 1
        self.bos_id = None  # documents start without one
        rng = np.random.default_rng([cfg.mock_seed, 0x6D6F636B])
        lengths = _draw_lengths(rng, cfg.num_tokens, cfg.mean_doc_len, cfg.max_doc_len)  # (D,)
        self.doc_starts = np.zeros(lengths.size + 1, np.int64)  # (D + 1,)
        np.cumsum(lengths, out=self.doc_starts[1:])
        modulus = max(1, self.vocab_size - 1)
        self._first = rng.integers(0, modulus, lengths.size)  # (D,)
        self._stride = rng.integers(1, max(2, modulus), lengths.size)  # (D,)
        self._modulus = modulus

    @property
    def num_documents(self) -> int:
        return self.doc_starts.size - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenated documents, shape (stop - start,) int64."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside a mock corpus of {self.num_tokens} tokens")
        pos = np.arange(start, stop, dtype=np.int64)  # (n,)
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1  # (n,)
        k = pos - self.doc_starts[doc]  # (n,) position in its document
        tokens = (self._first[doc] + self._stride[doc] * k) % self._modulus
        tokens[pos == self.doc_starts[doc + 1] - 1] = self.eod_id
        return tokens

    def document(self, i: int) -> np.ndarray:
        return self.read(int(self.doc_starts[i]), int(self.doc_starts[i + 1]))


def _draw_lengths(rng: np.random.Generator, num_tokens: int, mean: int, cap: int) -> np.ndarray:
    """Document lengths (>= 2, <= max(cap, 2)) summing to exactly ``num_tokens``."""
    chunks, total = [], 0
    while total < num_tokens:
        n = max(16, (num_tokens - total) // max(mean, 1) + 16)
        lengths = np.minimum(1 + np.floor(rng.exponential(max(mean - 1, 1e-9), n)), cap).astype(np.int64)
        lengths = np.maximum(lengths, 2)
        chunks.append(lengths)
        total += int(lengths.sum())
    lengths = np.concatenate(chunks)
    keep = int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1  # docs needed to reach num_tokens
    lengths = lengths[:keep]
    lengths[-1] -= int(lengths.sum()) - num_tokens  # trim the last document to the exact total
    return lengths
