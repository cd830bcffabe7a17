"""Token store format: round trip, dtypes, a >1M-token document, corruption and truncation."""

import json

import numpy as np
import pytest

from megaring.data import (
    BatchShape,
    DataConfig,
    RankShard,
    StoreError,
    build_batch_reader,
    describe_data,
    open_dataset,
    write_tokenized,
)
from megaring.data.store import HEADER, TokenStore, TokenStoreWriter, token_dtype

VOCAB, EOD = 1000, 999


def make_docs(rng, lengths, vocab=VOCAB, eod=EOD):
    """Documents of the given lengths, random ids below ``eod``, each ending with ``eod``."""
    docs = [rng.integers(0, eod, n) for n in lengths]
    for d in docs:
        d[-1] = eod
    return docs


@pytest.fixture
def small_store(tmp_path):
    docs = make_docs(np.random.default_rng(0), [5, 1, 17, 300, 2])
    return write_tokenized(tmp_path / "ds", docs, vocab_size=VOCAB, eod_id=EOD), docs


def test_round_trip_documents_and_offsets(small_store):
    ds, docs = small_store
    assert ds.num_documents == len(docs) and ds.num_tokens == sum(map(len, docs))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(i), doc)
    np.testing.assert_array_equal(ds.document(-1), docs[-1])
    np.testing.assert_array_equal(ds.doc_starts, np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
    np.testing.assert_array_equal(ds.read(3, 30), np.concatenate(docs)[3:30])
    with pytest.raises(IndexError):
        ds.read(0, ds.num_tokens + 1)


def test_writer_batches_and_dtype(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big = np.array([70_000, 1, 65_536, 3], dtype=np.int64)
    w = TokenStoreWriter(tmp_path, token_dtype(100_000))
    w.add(big[:3], np.array([1, 2]))
    w.add(big[3:], np.array([1]))
    w.close()
    store = TokenStore(tmp_path, verify=True)
    assert store.dtype == np.uint32 and store.num_documents == 3
    np.testing.assert_array_equal(store.read(0, 4), big)
    np.testing.assert_array_equal(store.lengths, [1, 2, 1])
    (tmp_path / "w2").mkdir()
    with pytest.raises(ValueError, match="sum"):
        TokenStoreWriter(tmp_path / "w2", np.uint16).add(np.zeros(3), np.array([2]))


def test_million_token_document_crosses_many_samples(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [700, 1_234_567, 90, 5_000]  # the long document spans ~300 samples of 4096
    docs = make_docs(rng, lengths)
    ds = write_tokenized(tmp_path / "ds", docs, vocab_size=VOCAB, eod_id=EOD)
    np.testing.assert_array_equal(ds.document(1), docs[1])
    stream = np.concatenate(docs)
    seq_len = 4096
    reader = build_batch_reader(DataConfig(kind="files", path=str(ds.path)), BatchShape(seq_len, 1, 1),
                                RankShard(), seed=0)
    assert reader.num_samples == (stream.size - 1) // seq_len
    # Samples wholly inside the long document: one segment, positions restart at the sample start.
    inside = [k for k in range(reader.num_samples)
              if 700 < reader.index.locate(k)[1] < 700 + 1_234_567 - seq_len - 1][:5]
    assert len(inside) == 5
    for k in inside:
        sample = reader.read_sample(k)
        start = reader.index.locate(k)[1]
        np.testing.assert_array_equal(sample["tokens"], stream[start:start + seq_len])
        np.testing.assert_array_equal(sample["labels"], stream[start + 1:start + seq_len + 1])
        np.testing.assert_array_equal(sample["segment_ids"], 0)
        np.testing.assert_array_equal(sample["positions"], np.arange(seq_len))
    # Every sample together covers the stream exactly once (plus the one-token overlap).
    starts = sorted(reader.index.locate(k)[1] for k in range(reader.num_samples))
    np.testing.assert_array_equal(starts, np.arange(reader.num_samples) * seq_len)


def _corrupt(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] + 1) % 256 if value is None else value
    path.write_bytes(bytes(data))


def test_truncated_bin_is_detected(small_store):
    ds, _ = small_store
    path = ds.path / "tokens.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(StoreError, match=r"tokens\.bin is truncated"):
        open_dataset(ds.path)


def test_corrupted_bin_is_detected_by_checksum(small_store):
    ds, _ = small_store
    _corrupt(ds.path / "tokens.bin", 10)
    open_dataset(ds.path)  # cheap open: sizes and index only
    with pytest.raises(StoreError, match=r"tokens\.bin is corrupted: bytes \[0, 1048576\) differ"):
        open_dataset(ds.path, verify=True)
    with pytest.raises(StoreError, match=r"bytes \[0, 1048576\) differ"):
        describe_data(DataConfig(kind="files", path=str(ds.path), verify_checksum=True))
    (ds.path / "tokens.blocks.json").unlink()  # a store from before block checksums
    with pytest.raises(StoreError, match=r"tokens\.bin is corrupted: checksum"):
        open_dataset(ds.path, verify=True)


@pytest.mark.parametrize("where", ["offsets", "footer", "truncate", "magic", "version", "header_short"])
def test_corrupted_or_truncated_idx_is_detected(small_store, where):
    ds, _ = small_store
    path = ds.path / "tokens.idx"
    expected = {"offsets": "checksum", "footer": "checksum", "truncate": "truncated or corrupted",
                "magic": "not a megaring token index", "version": "format version", "header_short": "truncated"}
    if where == "offsets":
        _corrupt(path, HEADER.size + 8)
    elif where == "footer":
        _corrupt(path, path.stat().st_size - 1)
    elif where == "truncate":
        path.write_bytes(path.read_bytes()[:-8])
    elif where == "magic":
        _corrupt(path, 0)
    elif where == "version":
        _corrupt(path, 8)
    else:
        path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(StoreError, match=expected[where]):
        open_dataset(ds.path)


def test_missing_pieces_and_metadata_mismatch(small_store, tmp_path):
    ds, _ = small_store
    with pytest.raises(StoreError, match="does not exist"):
        describe_data(DataConfig(kind="files", path=str(tmp_path / "nope")))
    meta = json.loads((ds.path / "metadata.json").read_text())
    meta["tokens"] += 1
    (ds.path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="metadata.json says"):
        open_dataset(ds.path)
    (ds.path / "tokens.idx").unlink()
    with pytest.raises(StoreError, match=r"tokens\.idx is missing"):
        open_dataset(ds.path)
    (ds.path / "metadata.json").unlink()
    with pytest.raises(StoreError, match="no metadata.json"):
        open_dataset(ds.path)
    with pytest.raises(StoreError, match="has no tokenizer"):
        _ = write_tokenized(tmp_path / "t", [np.array([1, EOD])], vocab_size=VOCAB, eod_id=EOD).tokenizer
