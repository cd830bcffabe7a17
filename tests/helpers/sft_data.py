"""Synthetic chat-like token stores: documents of a long untrained prompt then a trained answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megaring.data import write_tokenized


def masked_documents(n_docs: int, vocab_size: int, *, seed: int = 0, prompt=(20, 120), answer=(2, 24),
                     trained: bool = True):
    """(documents, masks): each document is prompt ids, answer ids, then the end-of-document id
    ``vocab_size - 1``; its mask is 0 over the prompt and 1 over the answer and the end id
    (all 0 when ``trained`` is False)."""
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for _ in range(n_docs):
        p, a = int(rng.integers(*prompt)), int(rng.integers(*answer))
        docs.append(np.append(rng.integers(0, vocab_size - 1, p + a), vocab_size - 1))
        masks.append(np.r_[np.zeros(p, np.uint8), np.full(a + 1, int(trained), np.uint8)])
    return docs, masks


def write_masked_store(path: Path, n_docs: int = 80, vocab_size: int = 256, **kw):
    docs, masks = masked_documents(n_docs, vocab_size, **kw)
    return write_tokenized(path, docs, vocab_size=vocab_size, eod_id=vocab_size - 1, masks=masks)
