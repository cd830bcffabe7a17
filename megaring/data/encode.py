"""Parallel, streaming encoding of raw records into flat token arrays.

The main process reads raw records and groups them into batches of about ``batch_bytes``;
worker processes decode (UTF-8 / JSON), encode with the tokenizer, put the BOS id (when the
tokenizer's conventions have one) before each document and append the end-of-document id.
At most ``2 * workers`` batches are in flight and results come back in input order, so memory
is bounded by the batches in flight, never by corpus size.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megaring.data.sources import InputError, Record, decode_record
from megaring.data.tokenizer import Tokenizer


@dataclass
class EncodeSpec:
    """What a worker needs besides the records (picklable)."""

    tokenizer: Tokenizer  # pickles as its files and ids
    text_key: str
    skip_bad_lines: bool
    dtype: str  # "<u2" | "<u4"
    split_lines: bool = False  # encode long texts in pieces cut after newlines (same ids, faster)


PIECE_CHARS = 1 << 16  # target characters per piece when split_lines is set


@dataclass
class EncodedBatch:
    """A batch of documents, flat: ``tokens`` (sum(lengths),), ``lengths`` (n_docs,)."""

    tokens: np.ndarray
    lengths: np.ndarray
    input_bytes: int = 0
    empty: int = 0  # records with no text (not stored)
    bad: list[str] = field(default_factory=list)  # skipped records' error messages


_worker_state: dict = {}


def _init_worker(spec: EncodeSpec, in_child: bool = False) -> None:
    if in_child:  # one thread per worker process: the pool is the parallelism (and tokenizers warns after fork)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state["spec"] = spec


def encode_batch(records: list[Record]) -> EncodedBatch:
    """Encode one batch in a worker (after :func:`_init_worker`)."""
    spec = _worker_state["spec"]
    texts, bad = [], []
    for record in records:
        try:
            texts.append(decode_record(record, spec.text_key))
        except InputError as e:
            if not spec.skip_bad_lines:
                raise
            bad.append(str(e))
    nonempty = [t for t in texts if t]
    tokens, lengths = _encode_texts(spec.tokenizer, nonempty, spec)
    return EncodedBatch(tokens, lengths, sum(len(r.data) for r in records), len(texts) - len(nonempty), bad)


def _encode_texts(tokenizer: Tokenizer, texts: list[str], spec: EncodeSpec):
    """Flat ids of ``texts``, each as [BOS] ids EOD: (tokens (T,), lengths (n,))."""
    pieces, owner = [], []  # pieces in document order; owner[i] = document of piece i
    for doc, text in enumerate(texts):
        parts = line_pieces(text) if spec.split_lines else [text]
        pieces.extend(parts)
        owner.extend([doc] * len(parts))
    ids = tokenizer.encode_batch(pieces)
    piece_lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    bos = [] if tokenizer.bos_id is None else [np.array([tokenizer.bos_id], spec.dtype)]
    lengths = np.bincount(np.asarray(owner, np.int64), piece_lengths, len(texts)).astype(np.int64) + 1 + len(bos)
    eod = np.array([tokenizer.eod_id], spec.dtype)
    chunks = []
    for i, x in enumerate(ids):
        if i == 0 or owner[i - 1] != owner[i]:
            chunks.extend(bos)  # the document's first piece
        chunks.append(x)
        if i + 1 == len(ids) or owner[i + 1] != owner[i]:
            chunks.append(eod)  # the document's last piece is done
    tokens = np.concatenate(chunks).astype(spec.dtype, copy=False) if chunks else np.zeros(0, spec.dtype)
    return tokens, lengths


def line_pieces(text: str) -> list[str]:
    """``text`` cut right after the first newline past every ``PIECE_CHARS`` characters."""
    out, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + PIECE_CHARS)
        stop = len(text) if cut < 0 else cut + 1
        out.append(text[start:stop])
        start = stop
    return out


def batch_records(records: Iterable[Record], batch_bytes: int) -> Iterator[list[Record]]:
    """Group records into lists of about ``batch_bytes`` input bytes."""
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record.data)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_stream(batches: Iterable[list[Record]], spec: EncodeSpec, workers: int) -> Iterator[EncodedBatch]:
    """Encode ``batches`` in order with ``workers`` processes (0: in this process)."""
    if workers == 0:
        _init_worker(spec)
        yield from map(encode_batch, batches)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec, True)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
