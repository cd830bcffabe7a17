"""The tokenizer interface shared by the sentencepiece and Hugging Face ``tokenizers`` implementations.

A tokenizer maps text to ids without special tokens; the conventions of a checkpoint travel
beside it as two ids: ``bos_id`` (put at each document start, or ``None`` when the checkpoint's
tokenizer adds none) and ``eod_id`` (appended to every document). Both are decided once, when a
tokenizer is loaded from its files (:func:`megaring.data.tokenizer.load_tokenizer`), and then
recorded in the store's ``metadata.json``, which is what reopens it.
"""

from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or trained; the message names the file."""


class Tokenizer(ABC):
    """Text <-> ids, plus the ids and files a token store records.

    ``files`` maps the name each file has in a store or model directory (``tokenizer.json``,
    ``tokenizer_config.json``, ``tokenizer.model``, ...) to where it is now; the first entry is
    the model file that defines the ids (its hash is :meth:`sha256`).
    """

    kind: str  # "sentencepiece" | "tokenizers": recorded in metadata.json

    def __init__(self, files: dict[str, Path], *, bos_id: int | None, eod_id: int):
        self.files = dict(files)
        self.bos_id, self.eod_id = bos_id, eod_id
        for name, value in (("bos_id", bos_id), ("eod_id", eod_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise TokenizerError(f"{self.path}: {name} {value} is outside the vocabulary of {self.vocab_size}")

    @property
    def path(self) -> Path:
        """The model file (``tokenizer.json`` or the sentencepiece ``.model``)."""
        return next(iter(self.files.values()))

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (every id is below it)."""

    @property
    @abstractmethod
    def splits_at_newlines(self) -> bool:
        """True when encoding text in pieces cut after newlines gives the same ids as encoding it whole."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of each text, no special tokens added: one integer array per text, one thread."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (BOS, end of document) decode to nothing."""

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS, no end-of-document id)."""
        return [int(i) for i in self.encode_batch([text])[0]]

    def sha256(self) -> str:
        """sha256 of the model file: equal hashes mean equal ids for every text."""
        return file_sha256(self.path)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file, by its name in a store."""
        return {name: file_sha256(p) for name, p in self.files.items()}

    def copy_to(self, directory: str | Path) -> Tokenizer:
        """Copy the files into ``directory`` under their store names; the same tokenizer, read from there."""
        directory = Path(directory)
        for name, src in self.files.items():
            shutil.copyfile(src, directory / name)
        return type(self)({name: directory / name for name in self.files}, bos_id=self.bos_id, eod_id=self.eod_id)

    def metadata(self) -> dict:
        """The ``tokenizer`` entry of ``metadata.json`` (``file`` is the model file, as in older stores)."""
        return {"kind": self.kind, "file": next(iter(self.files)), "files": list(self.files),
                "sha256": self.sha256(), "file_sha256": self.file_hashes(), "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eod_id": self.eod_id}

    def __reduce__(self):
        """Pickles as its files and ids (worker processes reload the files)."""
        return _reload, (type(self), self.files, self.bos_id, self.eod_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, " \
               f"bos_id={self.bos_id}, eod_id={self.eod_id})"


def _reload(cls: type[Tokenizer], files: dict[str, Path], bos_id: int | None, eod_id: int) -> Tokenizer:
    return cls(files, bos_id=bos_id, eod_id=eod_id)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
