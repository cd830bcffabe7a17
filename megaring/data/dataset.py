"""``open_dataset(dir)``: a preprocessed directory (token store, tokenizer, metadata) for inspection
and reading.

    ds = open_dataset("data/stdlib")
    ds.num_documents, ds.num_tokens, ds.vocab_size
    ds.text(0)                    # == ds.tokenizer.decode(ds.document(0))
    ds.tokenizer_files            # the tokenizer files to copy into an exported model

``metadata.json``'s ``tokenizer`` entry: ``kind`` ("sentencepiece" | "tokenizers"; absent in
older stores: sentencepiece), ``file`` (the model file; null: written from token ids),
``files`` (every tokenizer file in the directory), ``sha256`` (of ``file``), ``file_sha256``
(per file), ``vocab_size``, ``bos_id`` (null: documents start without one), ``eod_id``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from megaring.data.store import (
    BIN_NAME,
    BLOCKS_NAME,
    StoreError,
    TokenStore,
    TokenStoreWriter,
    first_id_outside,
    token_dtype,
)
from megaring.data.tokenizer import KINDS, Tokenizer, TokenizerError

METADATA_NAME = "metadata.json"


class Dataset:
    """A token store directory written by ``megaring-preprocess``; also a token source for the reader."""

    def __init__(self, path: str | Path, *, verify: bool = False):
        self.path = Path(path)
        if self.path.is_file():
            raise StoreError(_file_not_store(self.path))
        if not self.path.is_dir():
            raise StoreError(f"data directory {self.path} does not exist (write it with megaring-preprocess)")
        meta_path = self.path / METADATA_NAME
        if not meta_path.is_file():
            raise StoreError(f"{self.path} is not a complete megaring token store: no {METADATA_NAME}")
        try:
            self.metadata = json.loads(meta_path.read_text())
            self.vocab_size = int(self.metadata["tokenizer"]["vocab_size"])
            self.eod_id = int(self.metadata["tokenizer"]["eod_id"])
            bos_id = self.metadata["tokenizer"].get("bos_id")
            self.bos_id = None if bos_id is None else int(bos_id)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{meta_path} is corrupted: {e!r}") from e
        self.store = TokenStore(self.path, verify=verify)
        counts = (self.store.num_documents, self.store.num_tokens)
        if counts != (self.metadata.get("documents"), self.metadata.get("tokens")):
            raise StoreError(f"{self.path}: the index holds {counts[0]} documents and {counts[1]} tokens, "
                             f"{METADATA_NAME} says {self.metadata.get('documents')} and {self.metadata.get('tokens')}")
        self._check_ids(full=verify)

    def _check_ids(self, full: bool) -> None:
        """Ids below the vocabulary: the recorded max id (cheap, every open); ``full``: every token."""
        blocks = self.path / BLOCKS_NAME
        max_id = json.loads(blocks.read_text()).get("max_id", -1) if blocks.is_file() else -1
        if max_id >= self.vocab_size:
            raise StoreError(f"{blocks} records token id {max_id}, outside the vocabulary of {self.vocab_size} "
                             f"({self.path / METADATA_NAME}): preprocess the data again with the right tokenizer")
        where = first_id_outside(self.store, self.vocab_size) if full else None
        if where is not None:
            itemsize = self.store.dtype.itemsize
            raise StoreError(f"{self.path / BIN_NAME} holds token id {int(self.store.read(where, where + 1)[0])} "
                             f"at token {where} (bytes [{where * itemsize}, {(where + 1) * itemsize})), outside the "
                             f"vocabulary of {self.vocab_size}: the file was changed after preprocessing")

    @property
    def num_documents(self) -> int:
        return self.store.num_documents

    @property
    def num_tokens(self) -> int:
        return self.store.num_tokens

    @property
    def doc_starts(self) -> np.ndarray:
        """(num_documents + 1,) int64 token offset of each document start."""
        return self.store.offsets

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenated documents (memory-mapped read)."""
        return self.store.read(start, stop)

    def read_mask(self, start: int, stop: int) -> np.ndarray | None:
        """Loss mask of tokens ``[start, stop)`` (bool), or None when every token is trained."""
        return self.store.read_mask(start, stop)

    @property
    def has_mask(self) -> bool:
        return self.store.has_mask

    def document(self, i: int) -> np.ndarray:
        """Document ``i`` as token ids, its end-of-document id last."""
        return self.store.document(i)

    def text(self, i: int) -> str:
        """Document ``i`` decoded back to text."""
        return self.tokenizer.decode(self.document(i))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    @property
    def tokenizer_files(self) -> list[Path]:
        """The tokenizer's files in this directory, model file first (empty when written from token ids)."""
        meta = self.metadata["tokenizer"]
        names = meta.get("files") or ([meta["file"]] if meta.get("file") else [])
        return [self.path / name for name in names]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer stored with the data, with the recorded BOS / end-of-document ids and hashes checked."""
        meta = self.metadata["tokenizer"]
        files = {p.name: p for p in self.tokenizer_files}
        if not files:
            raise StoreError(f"{self.path} was written from token ids and has no tokenizer")
        kind = meta.get("kind", "sentencepiece")
        if kind not in KINDS:
            raise StoreError(f"{self.path / METADATA_NAME}: unknown tokenizer kind {kind!r} (one of {list(KINDS)})")
        try:
            tok = KINDS[kind](files, bos_id=self.bos_id, eod_id=self.eod_id)
        except TokenizerError as e:
            raise StoreError(f"{self.path}: the stored tokenizer cannot be loaded: {e}") from e
        expected = {tok.path.name: meta.get("sha256"), **meta.get("file_sha256", {})}
        for name, digest in tok.file_hashes().items():
            if expected.get(name) and digest != expected[name]:
                raise StoreError(f"{self.path / name} does not match the tokenizer recorded in {METADATA_NAME} "
                                 "(sha256)")
        return tok

    def __repr__(self) -> str:
        return (f"Dataset({str(self.path)!r}, documents={self.num_documents:,}, tokens={self.num_tokens:,}, "
                f"vocab_size={self.vocab_size:,})")


def _file_not_store(path: Path) -> str:
    """Why a file is not a token store, and what to name instead."""
    if (path.parent / METADATA_NAME).is_file():
        return f"{path} is a file of a token store: name its directory {path.parent}"
    return (f"{path} is a file, not a token store directory: preprocess it first (megaring-preprocess "
            f"input={path} output=<dir>) and name that directory")


def open_dataset(path: str | Path, *, verify: bool = False) -> Dataset:
    """Open a preprocessed directory; ``verify=True`` also checks the ``.bin`` checksum (full read)."""
    return Dataset(path, verify=verify)


def write_tokenized(path: str | Path, documents: Iterable[np.ndarray], *, vocab_size: int, eod_id: int,
                    bos_id: int | None = None, masks: Iterable[np.ndarray] | None = None) -> Dataset:
    """Write already tokenized documents (each ending with ``eod_id``) as a data directory.

    For synthetic data in tests and benchmarks; there is no tokenizer. ``masks``: one 0 / 1 loss
    mask per document (a ``tokens.mask`` store). Writes in place (no temporary directory), so
    ``path`` must not exist.
    """
    path = Path(path)
    path.mkdir(parents=True)
    writer = TokenStoreWriter(path, token_dtype(vocab_size), with_mask=masks is not None)
    mask_iter = iter(masks) if masks is not None else None
    for doc in documents:
        doc = np.asarray(doc)
        if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        writer.add(doc, np.array([doc.size]), None if mask_iter is None else next(mask_iter))
    writer.close()
    meta = {"documents": writer.num_documents, "tokens": writer.num_tokens, "dtype": writer.dtype.name,
            "trained_tokens": writer.trained_tokens,
            "tokenizer": {"file": None, "vocab_size": vocab_size, "bos_id": bos_id, "eod_id": eod_id}}
    (path / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Dataset(path)
