"""``open_dataset(dir)``: a preprocessed directory (token store, tokenizer, metadata) for inspection
and reading.

    ds = open_dataset("data/stdlib")
    ds.num_documents, ds.num_tokens, ds.vocab_size
    ds.text(0)                    # == ds.tokenizer.decode(ds.document(0))
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from megaring.data.store import StoreError, TokenStore, TokenStoreWriter, token_dtype
from megaring.data.tokenizer import Tokenizer

METADATA_NAME, TOKENIZER_NAME = "metadata.json", "tokenizer.model"


class Dataset:
    """A token store directory written by ``megaring-preprocess``; also a token source for the reader."""

    def __init__(self, path: str | Path, *, verify: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"data directory {self.path} does not exist (write it with megaring-preprocess)")
        meta_path = self.path / METADATA_NAME
        if not meta_path.is_file():
            raise StoreError(f"{self.path} is not a complete megaring token store: no {METADATA_NAME}")
        try:
            self.metadata = json.loads(meta_path.read_text())
            self.vocab_size = int(self.metadata["tokenizer"]["vocab_size"])
            self.eod_id = int(self.metadata["tokenizer"]["eod_id"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{meta_path} is corrupted: {e!r}") from e
        self.store = TokenStore(self.path, verify=verify)
        counts = (self.store.num_documents, self.store.num_tokens)
        if counts != (self.metadata.get("documents"), self.metadata.get("tokens")):
            raise StoreError(f"{self.path}: the index holds {counts[0]} documents and {counts[1]} tokens, "
                             f"{METADATA_NAME} says {self.metadata.get('documents')} and {self.metadata.get('tokens')}")

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

    def document(self, i: int) -> np.ndarray:
        """Document ``i`` as token ids, its end-of-document id last."""
        return self.store.document(i)

    def text(self, i: int) -> str:
        """Document ``i`` decoded back to text."""
        return self.tokenizer.decode(self.document(i))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The sentencepiece model stored with the data (checked against its recorded hash)."""
        if not self.metadata["tokenizer"].get("file"):
            raise StoreError(f"{self.path} was written from token ids and has no tokenizer")
        tok = Tokenizer(self.path / TOKENIZER_NAME)
        expected = self.metadata["tokenizer"].get("sha256")
        if expected and tok.sha256() != expected:
            raise StoreError(f"{tok.path} does not match the tokenizer recorded in {METADATA_NAME} (sha256)")
        return tok

    def __repr__(self) -> str:
        return (f"Dataset({str(self.path)!r}, documents={self.num_documents:,}, tokens={self.num_tokens:,}, "
                f"vocab_size={self.vocab_size:,})")


def open_dataset(path: str | Path, *, verify: bool = False) -> Dataset:
    """Open a preprocessed directory; ``verify=True`` also checks the ``.bin`` checksum (full read)."""
    return Dataset(path, verify=verify)


def write_tokenized(path: str | Path, documents: Iterable[np.ndarray], *, vocab_size: int, eod_id: int) -> Dataset:
    """Write already tokenized documents (each ending with ``eod_id``) as a data directory.

    For synthetic data in tests and benchmarks; there is no tokenizer. Writes in place (no
    temporary directory), so ``path`` must not exist.
    """
    path = Path(path)
    path.mkdir(parents=True)
    writer = TokenStoreWriter(path, token_dtype(vocab_size))
    for doc in documents:
        doc = np.asarray(doc)
        if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        writer.add(doc, np.array([doc.size]))
    writer.close()
    meta = {"documents": writer.num_documents, "tokens": writer.num_tokens, "dtype": writer.dtype.name,
            "tokenizer": {"file": None, "vocab_size": vocab_size, "eod_id": eod_id}}
    (path / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Dataset(path)
