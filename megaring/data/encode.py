"""Parallel, streaming encoding of raw records into flat token arrays.

The main process reads raw records and groups them into batches of about ``batch_bytes``;
worker processes decode (UTF-8 / JSON), encode with the tokenizer, put the BOS id (when the
tokenizer's conventions have one) before each document and append the end-of-document id.
Chat and prompt/completion records (``spec.chat``, :mod:`megaring.data.chat`) also get a
per-token loss mask. At most ``2 * workers`` batches are in flight and results come back in input order, so memory
is bounded by the batches in flight, never by corpus size.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megaring.data.chat import (
    ChatSpec,
    NoAssistantError,
    chat_ids,
    checked_messages,
    load_chat_tokenizer,
    prompt_completion_ids,
    record_object,
)
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
    chat: ChatSpec | None = None  # masked records (chat, prompt/completion); None: plain text


PIECE_CHARS = 1 << 16  # target characters per piece when split_lines is set


@dataclass
class EncodedBatch:
    """A batch of documents, flat: ``tokens`` (sum(lengths),), ``lengths`` (n_docs,)."""

    tokens: np.ndarray
    lengths: np.ndarray
    input_bytes: int = 0
    empty: int = 0  # records with no text (not stored)
    bad: list[str] = field(default_factory=list)  # skipped records' error messages
    mask: np.ndarray | None = None  # (sum(lengths),) uint8 loss mask of masked formats
    dropped: dict[str, int] = field(default_factory=dict)  # masked formats: "no_assistant", "too_long"


_worker_state: dict = {}


def _init_worker(spec: EncodeSpec, in_child: bool = False) -> None:
    if in_child:  # one thread per worker process: the pool is the parallelism (and tokenizers warns after fork)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state["spec"] = spec


def encode_batch(records: list[Record]) -> EncodedBatch:
    """Encode one batch in a worker (after :func:`_init_worker`)."""
    spec = _worker_state["spec"]
    if spec.chat is not None:
        return _encode_masked(records, spec)
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


def _chat_tokenizer(spec: EncodeSpec):
    """transformers' tokenizer, loaded once per worker (and per spec: workers=0 runs many in one process)."""
    key = (spec.chat.model_dir, spec.chat.chat_template)
    if _worker_state.get("chat_key") != key:
        _worker_state["chat_tok"] = load_chat_tokenizer(*key)
        _worker_state["chat_key"] = key
    return _worker_state["chat_tok"]


def _masked_ids(record: Record, spec: EncodeSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, mask) of one chat or prompt/completion record; None for an empty conversation."""
    obj = record_object(record)
    if spec.chat.format == "prompt_completion":
        return prompt_completion_ids(spec.tokenizer, obj, record.where)
    messages = checked_messages(obj, record.where)
    if not messages:
        return None
    return chat_ids(_chat_tokenizer(spec), messages, spec.chat.train_on, spec.tokenizer.eod_id, record.where)


def _encode_masked(records: list[Record], spec: EncodeSpec) -> EncodedBatch:
    """Encode masked records; bad ones raise, or with ``skip_bad_lines`` are counted."""
    docs, masks, bad, empty = [], [], [], 0
    dropped = {"no_assistant": 0, "too_long": 0}
    for record in records:
        try:
            out = _masked_ids(record, spec)
        except InputError as e:
            if not spec.skip_bad_lines:
                raise
            bad.append(str(e))
            dropped["no_assistant"] += isinstance(e, NoAssistantError)
            continue
        if out is None:
            empty += 1
        elif 0 < spec.chat.max_doc_tokens < out[0].size:
            dropped["too_long"] += 1
        else:
            docs.append(out[0])
            masks.append(out[1])
    lengths = np.fromiter(map(len, docs), np.int64, len(docs))
    tokens = np.concatenate(docs).astype(spec.dtype) if docs else np.zeros(0, spec.dtype)
    mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    return EncodedBatch(tokens, lengths, sum(len(r.data) for r in records), empty, bad, mask, dropped)


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
