"""Input discovery and raw records for ``megaring-preprocess``.

An input is a file, a directory (every non-hidden file below it, sorted), a glob, a list of
those, or ``stdlib`` (see :mod:`megaring.data.stdlib_corpus`). Files ending in ``.jsonl`` or
``.ndjson`` (optionally ``.gz``) hold one JSON document per line; ``.parquet`` files one
document per row, in the ``text_key`` column, read one record batch at a time (a file with a
``messages``, ``prompt`` or ``completion`` column gives each row as a JSON record of those columns
and ``text_key``, as a JSONL line would be: chat and prompt/completion data); any other file
is one plain text document (``.gz`` is decompressed). Records stay raw bytes here: decoding and
JSON parsing happen in the encoding workers (:func:`decode_record`), and so does reporting a
bad Parquet value (a record of kind ``"error"``), so ``skip_bad_lines`` counts every kind alike.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"
PARQUET_BATCH_ROWS = 1024  # rows read from a Parquet file at a time
# Parquet columns of chat and prompt/completion records (a row with any of them is read as a JSON record)
CONVERSATION_COLUMNS = ("messages", "prompt", "completion")
STDLIB = "stdlib"


class InputError(ValueError):
    """Bad preprocessing input; the message names the file (and line)."""


@dataclass(frozen=True)
class Record:
    """One raw document: its UTF-8 text (``kind="text"``), one JSON line (``kind="json"``), or
    why a value could not be a document (``kind="error"``, the message in ``data``)."""

    data: bytes
    kind: str
    where: str  # "path", "path:line" or "path:row N", for error messages


class Source(Protocol):
    name: str

    def records(self) -> Iterator[Record]: ...


@dataclass(frozen=True)
class FileSource:
    """A plain text file (one document) or a JSONL file (one document per line)."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def is_jsonl(self) -> bool:
        name = self.path.name.removesuffix(".gz")
        return name.endswith(JSONL_SUFFIXES)

    def records(self) -> Iterator[Record]:
        opener = gzip.open if self.path.name.endswith(".gz") else open
        try:
            with opener(self.path, "rb") as f:
                if not self.is_jsonl:
                    yield Record(f.read(), "text", self.name)
                    return
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield Record(line, "json", f"{self.name}:{line_no}")
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"cannot read {self.name}: {e}") from e


@dataclass(frozen=True)
class ParquetSource:
    """A Parquet file: one document per row, in column ``text_key`` (row numbers count from 0)."""

    path: Path
    text_key: str

    @property
    def name(self) -> str:
        return str(self.path)

    def records(self) -> Iterator[Record]:
        import pyarrow  # only Parquet input needs it
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
            columns = pf.schema_arrow.names
            wanted = [c for c in (self.text_key, *CONVERSATION_COLUMNS) if c in columns]
            if self.text_key not in columns and not set(CONVERSATION_COLUMNS) & set(columns):
                raise InputError(f"{self.name} has no column {self.text_key!r} (its columns: "
                                 f"{', '.join(columns)}); set text_key=<column>")
            as_json = wanted != [self.text_key]  # conversations: each row a JSON record, as a JSONL line
            row = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
                for value in batch.to_pylist():
                    where = f"{self.name}:row {row}"
                    if as_json:
                        yield Record(json.dumps(value, ensure_ascii=False).encode("utf-8"), "json", where)
                    else:
                        yield _parquet_record(value[self.text_key], self.text_key, where)
                    row += 1
        except (OSError, pyarrow.ArrowException) as e:
            raise InputError(f"cannot read {self.name} as Parquet: {e}") from e


def _parquet_record(value, text_key: str, where: str) -> Record:
    if isinstance(value, str):
        return Record(value.encode("utf-8"), "text", where)
    kind = "null" if value is None else type(value).__name__
    return Record(f"column {text_key!r} is {kind}, not a string".encode(), "error", where)


def resolve_sources(spec: str | Sequence[str], max_bytes: int = 0, *, text_key: str = "text") -> list[Source]:
    """The sources named by ``spec`` (see the module docstring), in a fixed order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise InputError("no input given")
    sources: list[Source] = []
    for s in specs:
        sources.extend(_resolve_one(str(s), max_bytes, text_key))
    return sources


def file_source(path: Path, text_key: str) -> Source:
    """The source of one input file, by its suffix."""
    if path.name.endswith(PARQUET_SUFFIX):
        return ParquetSource(path, text_key)
    return FileSource(path)


def _resolve_one(spec: str, max_bytes: int, text_key: str) -> list[Source]:
    if spec == STDLIB:
        from megaring.data.stdlib_corpus import stdlib_sources

        return list(stdlib_sources(max_bytes))
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in paths if p.is_file()]
        if not files:
            raise InputError(f"input {spec!r}: no files match this pattern")
        return [file_source(p, text_key) for p in files]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise InputError(f"input directory {spec} holds no files")
        return [file_source(p, text_key) for p in files]
    if path.is_file():
        return [file_source(path, text_key)]
    raise InputError(f"input {spec} does not exist")


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def decode_record(record: Record, text_key: str) -> str:
    """The document text of ``record``; raises :class:`InputError` naming file and line."""
    if record.kind == "error":
        raise InputError(f"{record.where}: {record.data.decode()}")
    try:
        if record.kind == "text":
            return record.data.decode("utf-8")
        obj = json.loads(record.data)
    except UnicodeDecodeError as e:
        raise InputError(f"{record.where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{record.where}: malformed JSON line ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or text_key not in obj:
        raise InputError(f"{record.where}: JSON line has no {text_key!r} field (set text_key=...)")
    text = obj[text_key]
    if not isinstance(text, str):
        raise InputError(f"{record.where}: field {text_key!r} is {type(text).__name__}, not a string")
    return text
