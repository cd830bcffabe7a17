"""The token store: documents back to back in ``tokens.bin``, located by ``tokens.idx``.

``tokens.bin``: the token ids of every document (each ending with the end-of-document id),
concatenated, as little-endian uint16 (vocab <= 65536) or uint32.

``tokens.mask`` (version 2 stores with flag bit 0 set; optional): one uint8 per token of
``tokens.bin``, 1 where the token is a trained label (the loss of predicting it counts), 0 where
it is not (prompt, system and role-header tokens of chat data). A store without it trains on
every token.

``tokens.idx`` (little-endian)::

    header   magic b"MRTOKIDX", version u32, dtype code u8 (1: uint16, 2: uint32), flags u8
             (bit 0: tokens.mask exists; 0 in version 1), 2 pad bytes, n_docs u64, n_tokens u64,
             crc32 of tokens.bin u32, crc32 of tokens.mask u32 (0 without one)   (40 bytes)
    offsets  int64[n_docs + 1]   token offset of each document start; offsets[-1] = n_tokens
    lengths  int64[n_docs]       tokens per document (= diff(offsets))
    footer   crc32 u32 of every byte above

``tokens.blocks.json`` (stores written since it exists; optional): ``{"block_bytes": B, "crc32":
[crc32 of bytes [i*B, (i+1)*B) of tokens.bin, ...], "max_id": the largest token id}``.

Opening checks the index (size, magic, version, checksum, offsets against lengths) and the
size of ``tokens.bin``; ``verify=True`` also checks the ``.bin`` checksum, block by block when
``tokens.blocks.json`` exists, so a mismatch names the first bad byte range. Reads go through a
memory map, so a read of ``[start, stop)`` touches only those bytes.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"MRTOKIDX"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no flags, no mask
HEADER = struct.Struct("<8sIBB2xQQII")  # magic, version, dtype code, flags, n_docs, n_tokens, bin crc32, mask crc32
FLAG_MASK = 1
DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
BIN_NAME, IDX_NAME, BLOCKS_NAME = "tokens.bin", "tokens.idx", "tokens.blocks.json"
MASK_NAME = "tokens.mask"
BLOCK_BYTES = 1 << 20  # bytes per recorded block checksum
_CRC_BLOCK = 16 << 20  # bytes checksummed per step when verifying


class StoreError(ValueError):
    """A token store that is missing, truncated or corrupted."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest stored dtype that holds every id of ``vocab_size``."""
    return DTYPE_CODES[1] if vocab_size <= 1 << 16 else DTYPE_CODES[2]


class TokenStoreWriter:
    """Appends documents to ``tokens.bin`` and writes ``tokens.idx`` on :meth:`close`.

    ``with_mask``: also write ``tokens.mask``; every :meth:`add` then passes the documents' mask.
    """

    def __init__(self, directory: str | Path, dtype: np.dtype, *, with_mask: bool = False):
        self.directory = Path(directory)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in DTYPE_CODES.values():
            raise ValueError(f"unsupported token dtype {dtype}")
        self._bin = open(self.directory / BIN_NAME, "wb")
        self._crc = 0
        self._block_crcs: list[int] = []  # of complete BLOCK_BYTES blocks
        self._block_crc, self._block_fill = 0, 0  # the block being written
        self._max_id = -1
        self._lengths: list[np.ndarray] = []
        self._mask = open(self.directory / MASK_NAME, "wb") if with_mask else None
        self._mask_crc = 0
        self.num_documents = 0
        self.num_tokens = 0
        self.trained_tokens = 0  # mask ones (every token without a mask)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents given flat: ``tokens`` (sum(lengths),), ``lengths`` (n_docs,), and with
        ``with_mask`` their ``mask`` (sum(lengths),) of 0 / 1."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or (lengths < 1).any():
            raise ValueError("lengths must be >= 1 and sum to the number of tokens")
        self._add_mask(mask, tokens.size)
        data = tokens.tobytes()
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._add_to_blocks(memoryview(data))
        self._max_id = max(self._max_id, int(tokens.max()) if tokens.size else -1)
        self._lengths.append(lengths)
        self.num_documents += lengths.size
        self.num_tokens += tokens.size

    def _add_mask(self, mask: np.ndarray | None, n_tokens: int) -> None:
        if (mask is None) != (self._mask is None):
            raise ValueError("pass a mask to add() exactly when the writer was made with with_mask=True")
        if mask is None:
            self.trained_tokens += n_tokens
            return
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        if mask.shape != (n_tokens,) or (mask > 1).any():
            raise ValueError(f"mask must be (n_tokens,) = ({n_tokens},) of 0 / 1, got shape {mask.shape}")
        data = mask.tobytes()
        self._mask.write(data)
        self._mask_crc = zlib.crc32(data, self._mask_crc)
        self.trained_tokens += int(mask.sum())

    def _add_to_blocks(self, data: memoryview) -> None:
        while len(data):
            take = min(BLOCK_BYTES - self._block_fill, len(data))
            self._block_crc = zlib.crc32(data[:take], self._block_crc)
            self._block_fill += take
            data = data[take:]
            if self._block_fill == BLOCK_BYTES:
                self._block_crcs.append(self._block_crc)
                self._block_crc, self._block_fill = 0, 0

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Write the index on success; on an error only close ``tokens.bin`` (the caller discards it)."""
        if exc_type is None:
            self.close()
        else:
            self._bin.close()
            if self._mask is not None:
                self._mask.close()

    def close(self) -> None:
        """Flush ``tokens.bin`` (and ``tokens.mask``) and write the index."""
        self._bin.close()
        if self._mask is not None:
            self._mask.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        code = next(c for c, dt in DTYPE_CODES.items() if dt == self.dtype)
        flags = FLAG_MASK if self._mask is not None else 0
        body = HEADER.pack(MAGIC, VERSION, code, flags, lengths.size, self.num_tokens, self._crc, self._mask_crc)
        body += offsets.astype("<i8").tobytes() + lengths.astype("<i8").tobytes()
        with open(self.directory / IDX_NAME, "wb") as f:
            f.write(body + struct.pack("<I", zlib.crc32(body)))
        crcs = self._block_crcs + ([self._block_crc] if self._block_fill else [])
        (self.directory / BLOCKS_NAME).write_text(json.dumps({"block_bytes": BLOCK_BYTES, "crc32": crcs,
                                                               "max_id": self._max_id}))


class TokenStore:
    """Read-only view of a token store directory.

    ``offsets`` (n_docs + 1,) int64 and ``lengths`` (n_docs,) int64 are memory-mapped;
    :meth:`read` copies one token range out of the memory-mapped ``tokens.bin``, :meth:`read_mask`
    the same range of ``tokens.mask`` (``has_mask`` False: every token is trained).
    """

    def __init__(self, directory: str | Path, *, verify: bool = False):
        self.directory = Path(directory)
        idx_path, bin_path = self.directory / IDX_NAME, self.directory / BIN_NAME
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise StoreError(f"{p} is missing: not a complete megaring token store")
        self.dtype, n_docs, self.num_tokens, self.bin_crc32, flags, self.mask_crc32 = _read_header(idx_path)
        self.has_mask = bool(flags & FLAG_MASK)
        self.index_crc32 = _check_index(idx_path, n_docs)
        self.offsets = np.memmap(idx_path, "<i8", "r", offset=HEADER.size, shape=(n_docs + 1,))
        self.lengths = np.memmap(idx_path, "<i8", "r", offset=HEADER.size + 8 * (n_docs + 1), shape=(n_docs,))
        _check_offsets(idx_path, self.offsets, self.lengths, self.num_tokens)
        _check_bin_size(bin_path, self.num_tokens, self.dtype)
        self._tokens = np.memmap(bin_path, self.dtype, "r", shape=(self.num_tokens,)) if self.num_tokens else None
        self._mask = self._open_mask() if self.has_mask else None
        self.bytes_read = 0  # token bytes copied by read(): a cheap I/O counter for benchmarks
        if verify:
            self.verify()

    def _open_mask(self) -> np.ndarray | None:
        mask_path = self.directory / MASK_NAME
        if not mask_path.is_file():
            raise StoreError(f"{mask_path} is missing: the index says this store has a loss mask")
        _check_bin_size(mask_path, self.num_tokens, np.dtype(np.uint8))
        return np.memmap(mask_path, np.uint8, "r", shape=(self.num_tokens,)) if self.num_tokens else None

    @property
    def num_documents(self) -> int:
        return self.lengths.shape[0]

    def read_mask(self, start: int, stop: int) -> np.ndarray | None:
        """Loss mask of tokens ``[start, stop)``, (stop - start,) bool; None when the store has no mask."""
        if not self.has_mask:
            return None
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside a store of {self.num_tokens} tokens")
        if start == stop:
            return np.zeros(0, bool)
        return np.array(self._mask[start:stop]) != 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenated stream, shape (stop - start,)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside a store of {self.num_tokens} tokens")
        self.bytes_read += (stop - start) * self.dtype.itemsize
        if start == stop:
            return np.zeros(0, self.dtype)
        return np.array(self._tokens[start:stop])

    def document(self, i: int) -> np.ndarray:
        """Document ``i`` (its end-of-document id included), shape (lengths[i],)."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} outside a store of {self.num_documents} documents")
        i %= self.num_documents
        return self.read(int(self.offsets[i]), int(self.offsets[i + 1]))

    def verify(self) -> None:
        """Check ``tokens.bin`` against its checksum (reads the whole file); with ``tokens.blocks.json``
        block by block, naming the first byte range that differs from what was written."""
        bin_path = self.directory / BIN_NAME
        blocks = self.directory / BLOCKS_NAME
        if blocks.is_file():
            recorded = json.loads(blocks.read_text())
            size = recorded["block_bytes"]
            with open(bin_path, "rb") as f:
                for i, want in enumerate(recorded["crc32"]):
                    got = zlib.crc32(f.read(size))
                    if got != want:
                        raise StoreError(f"{bin_path} is corrupted: bytes [{i * size}, {(i + 1) * size}) differ "
                                         f"from what megaring-preprocess wrote (crc32 {got:08x}, recorded {want:08x})")
        crc = _crc32(bin_path, bin_path.stat().st_size)
        if crc != self.bin_crc32:
            raise StoreError(f"{self.directory / BIN_NAME} is corrupted: checksum {crc:08x}, "
                             f"index says {self.bin_crc32:08x}")
        if self.has_mask:
            self._verify_mask()

    def _verify_mask(self) -> None:
        """The mask checksum, and only 0 / 1 values."""
        mask_path = self.directory / MASK_NAME
        crc = _crc32(mask_path, mask_path.stat().st_size)
        if crc != self.mask_crc32:
            raise StoreError(f"{mask_path} is corrupted: checksum {crc:08x}, index says {self.mask_crc32:08x}")
        for start in range(0, self.num_tokens, _CRC_BLOCK):
            bad = np.flatnonzero(self._mask[start:start + _CRC_BLOCK] > 1)
            if bad.size:
                raise StoreError(f"{mask_path} holds value {int(self._mask[start + bad[0]])} at token "
                                 f"{start + int(bad[0])}: a loss mask holds only 0 and 1")


def first_id_outside(store: TokenStore, vocab_size: int, chunk_tokens: int = 1 << 24) -> int | None:
    """The position of the first token id >= ``vocab_size`` (reads the whole store), or None."""
    for start in range(0, store.num_tokens, chunk_tokens):
        bad = np.flatnonzero(store.read(start, min(start + chunk_tokens, store.num_tokens)) >= vocab_size)
        if bad.size:
            return start + int(bad[0])
    return None


def _read_header(idx_path: Path) -> tuple[np.dtype, int, int, int, int, int]:
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise StoreError(f"{idx_path} is truncated: {len(raw)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, code, flags, n_docs, n_tokens, bin_crc, mask_crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise StoreError(f"{idx_path} is not a megaring token index (magic {magic!r}, expected {MAGIC!r})")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{idx_path} has format version {version}; this megaring reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version == 1:
        flags, mask_crc = 0, 0
    if code not in DTYPE_CODES:
        raise StoreError(f"{idx_path} is corrupted: unknown dtype code {code}")
    return DTYPE_CODES[code], n_docs, n_tokens, bin_crc, flags, mask_crc


def _check_index(idx_path: Path, n_docs: int) -> int:
    """Check the index size and checksum; returns the checksum."""
    expected = HEADER.size + 8 * (2 * n_docs + 1) + 4
    size = idx_path.stat().st_size
    if size != expected:
        raise StoreError(f"{idx_path} is truncated or corrupted: {size} bytes, expected {expected} "
                         f"for {n_docs} documents")
    with open(idx_path, "rb") as f:
        f.seek(size - 4)
        (stored,) = struct.unpack("<I", f.read(4))
    crc = _crc32(idx_path, size - 4)
    if crc != stored:
        raise StoreError(f"{idx_path} is corrupted: checksum {crc:08x}, stored {stored:08x}")
    return crc


def _crc32(path: Path, nbytes: int) -> int:
    """crc32 of the first ``nbytes`` of a file, read in bounded blocks."""
    crc = 0
    with open(path, "rb") as f:
        while nbytes > 0 and (block := f.read(min(_CRC_BLOCK, nbytes))):
            crc = zlib.crc32(block, crc)
            nbytes -= len(block)
    return crc


def _check_offsets(idx_path: Path, offsets: np.ndarray, lengths: np.ndarray, n_tokens: int) -> None:
    if offsets[0] != 0 or offsets[-1] != n_tokens or (lengths < 1).any() or (np.diff(offsets) != lengths).any():
        raise StoreError(f"{idx_path} is corrupted: document offsets and lengths disagree")


def _check_bin_size(bin_path: Path, n_tokens: int, dtype: np.dtype) -> None:
    size, expected = bin_path.stat().st_size, n_tokens * dtype.itemsize
    if size != expected:
        state = "truncated" if size < expected else "corrupted (too long)"
        raise StoreError(f"{bin_path} is {state}: {size} bytes, the index expects {expected} "
                         f"({n_tokens} tokens of {dtype.name})")
