"""Sample packing, sharded reads, sample order and the trainer-facing reader API."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from megaring.config_dir import CONFIG_DIR
from megaring.data import (
    BatchShape,
    DataConfig,
    MockSource,
    RankShard,
    build_batch_reader,
    describe_data,
    read_shard,
    write_tokenized,
)
from megaring.data.sample_index import split_documents
from megaring.layout import shard_ranges, shard_sequence, unshard_sequence

MOCK = DataConfig(kind="mock", vocab_size=97, num_tokens=40_000, mean_doc_len=300, max_doc_len=5_000)


def reader(cfg=MOCK, *, seq_len=64, G=8, mb=1, seed=0, dp_rank=0, dp=1, cp_rank=0, cp=1, layout="zigzag"):
    return build_batch_reader(cfg, BatchShape(seq_len, G, mb), RankShard(dp_rank, dp, cp_rank, cp, layout), seed=seed)


def reference_sample(source, start_token, seq_len, reset=True):
    """The whole sample, computed position by position (independently of read_shard)."""
    full = source.read(start_token, start_token + seq_len + 1).astype(np.int64)
    pos = start_token + np.arange(seq_len)
    doc = np.searchsorted(source.doc_starts, pos, side="right") - 1
    positions = pos - np.maximum(source.doc_starts[doc], start_token) if reset else np.arange(seq_len)
    return {"tokens": full[:-1], "labels": full[1:], "positions": positions, "segment_ids": doc - doc[0]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 200, 300).tolist() + [3000] + rng.integers(1, 50, 100).tolist()
    docs = [np.append(rng.integers(0, 60_000, n - 1), 65_000) for n in lengths]
    return write_tokenized(tmp_path_factory.mktemp("data") / "ds", docs, vocab_size=65_001, eod_id=65_000)


def test_explicit_packing_example(tmp_path):
    # Documents of 3, 5 and 4 tokens; a 6-token sample from token 1 covers doc 0 (2 tokens) and doc 1.
    ds = write_tokenized(tmp_path / "ds", [np.array([10, 11, 9]), np.array([20, 21, 22, 23, 9]),
                                           np.array([30, 31, 32, 9])], vocab_size=40, eod_id=9)
    out = read_shard(ds, 0, 1, [(0, 6)])
    np.testing.assert_array_equal(out["tokens"], [11, 9, 20, 21, 22, 23])
    np.testing.assert_array_equal(out["labels"], [9, 20, 21, 22, 23, 9])
    np.testing.assert_array_equal(out["segment_ids"], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["positions"], [0, 1, 0, 1, 2, 3])
    running = read_shard(ds, 0, 1, [(0, 6)], reset_positions=False)
    np.testing.assert_array_equal(running["positions"], np.arange(6))
    # A shard that starts inside document 1 still numbers segments from the sample's first document.
    edge = read_shard(ds, 0, 1, [(3, 5), (5, 7)])
    np.testing.assert_array_equal(edge["tokens"], [21, 22, 23, 9])
    np.testing.assert_array_equal(edge["labels"], [22, 23, 9, 30])
    np.testing.assert_array_equal(edge["segment_ids"], [1, 1, 1, 1])
    np.testing.assert_array_equal(edge["positions"], [1, 2, 3, 4])


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("kind", ["mock", "files"])
def test_shards_equal_slices_of_the_full_sample(store, layout, kind):
    cfg = MOCK if kind == "mock" else DataConfig(kind="files", path=str(store.path))
    seq_len = 336  # divisible by 2*cp for cp in 1..8 (lcm 1..8 * 2 = 1680 would be large; 336 = 16*21)
    for cp in range(1, 9):
        if seq_len % (2 * cp if layout == "zigzag" else cp):
            continue
        shards = [reader(cfg, seq_len=seq_len, cp_rank=r, cp=cp, layout=layout) for r in range(cp)]
        source = shards[0].source
        for k in (0, 5, 11):
            _, start = shards[0].index.locate(k)
            ref = reference_sample(source, start, seq_len)
            got = [s.read_sample(k) for s in shards]
            for f, full in ref.items():
                full_t = torch.from_numpy(full)
                for r in range(cp):
                    expect = shard_sequence(full_t, dim=0, rank=r, world_size=cp, layout=layout)
                    np.testing.assert_array_equal(got[r][f], expect.numpy(), err_msg=f"{f} cp={cp} rank={r}")
                joined = unshard_sequence([torch.from_numpy(g[f]) for g in got], dim=0, layout=layout)
                np.testing.assert_array_equal(joined.numpy(), full)


def test_cp_sizes_one_to_eight_all_covered():
    # 3360 = lcm(2, 4, ..., 16): every cp in 1..8 runs the zigzag layout on the same samples.
    seq_len = 3360
    ref_reader = reader(seq_len=seq_len)
    for cp in range(1, 9):
        shards = [reader(seq_len=seq_len, cp_rank=r, cp=cp) for r in range(cp)]
        for k in (0, 3):
            full = ref_reader.read_sample(k)
            got = [s.read_sample(k) for s in shards]
            for f in full:
                joined = unshard_sequence([torch.from_numpy(g[f]) for g in got], dim=0, layout="zigzag")
                np.testing.assert_array_equal(joined.numpy(), full[f], err_msg=f"{f} cp={cp}")


def test_labels_at_chunk_edges_and_bytes_read(store):
    cfg = DataConfig(kind="files", path=str(store.path))
    seq_len, cp = 256, 4
    for r in range(cp):
        rd = reader(cfg, seq_len=seq_len, cp_rank=r, cp=cp)
        _, start = rd.index.locate(2)
        before = rd.source.store.bytes_read
        out = rd.read_sample(2)
        # Only this rank's 2 chunks (plus one label token each) come out of the memory map.
        assert rd.source.store.bytes_read - before == (seq_len // cp + 2) * 2
        stream = store.read(start, start + seq_len + 1)
        for i, (a, b) in enumerate(shard_ranges(seq_len, r, cp, "zigzag")):
            c = seq_len // (2 * cp)
            assert out["labels"][i * c + c - 1] == stream[b]  # the label past the chunk's last token
            assert out["tokens"][i * c] == stream[a]


def test_segments_and_positions_cross_document_boundaries():
    rd = reader(seq_len=512)
    src = rd.source
    seen_boundary = False
    for k in range(20):
        start_doc, start = rd.index.locate(k)
        out = rd.read_sample(k)
        boundaries = np.flatnonzero(np.diff(out["segment_ids"])) + 1
        assert (np.diff(out["segment_ids"]) >= 0).all() and out["segment_ids"][0] == 0
        assert (out["positions"][boundaries] == 0).all() and out["positions"].max() < 512  # restarts
        assert (out["tokens"][boundaries - 1] == src.eod_id).all()  # previous document ended
        assert (np.diff(out["positions"])[np.diff(out["segment_ids"]) == 0] == 1).all()
        assert start_doc == np.searchsorted(src.doc_starts, start, side="right") - 1
        seen_boundary |= boundaries.size > 0
    assert seen_boundary


def test_micro_batches_shapes_and_validation():
    rd = reader(seq_len=64, G=8, mb=2, dp=2, dp_rank=1, cp=2, cp_rank=1)
    batches = rd.micro_batches(3)
    assert len(batches) == 8 // (2 * 2)
    for b in batches:
        assert set(b) == {"tokens", "labels", "positions", "segment_ids"}
        for t in b.values():
            assert t.dtype == torch.int64 and t.shape == (2, 32)
    assert rd.vocab_size == MOCK.vocab_size and rd.eod_id == MOCK.vocab_size - 1
    with pytest.raises(ValueError, match="divisible by micro_batch_size"):
        reader(G=6, mb=4)
    with pytest.raises(ValueError, match="divisible by"):
        reader(seq_len=66, cp=2)
    with pytest.raises(ValueError, match="fewer than one sample"):
        reader(seq_len=50_000)


def test_determinism_and_seed():
    a, b, c = reader(seed=7), reader(seed=7), reader(seed=8)
    for step in (0, 4):
        for x, y in zip(a.micro_batches(step), b.micro_batches(step)):
            assert all(torch.equal(x[f], y[f]) for f in x)
    order = lambda r: [r.index.locate(k)[1] for k in range(r.num_samples)]  # noqa: E731
    assert order(a) == order(b) and order(a) != order(c)
    assert sorted(order(a)) == sorted(order(c))


def _global_batch(step, *, G, mb, dp, cp, layout="zigzag", seq_len=64):
    """Full samples of ``step`` in global order, rebuilt from every (dp, cp) rank's shards."""
    samples = []
    for dp_rank in range(dp):
        ranks = [reader(seq_len=seq_len, G=G, mb=mb, dp=dp, dp_rank=dp_rank, cp=cp, cp_rank=r, layout=layout)
                 for r in range(cp)]
        per_rank = [rd.micro_batches(step) for rd in ranks]
        for m in range(len(per_rank[0])):
            for row in range(mb):
                samples.append({f: unshard_sequence([per_rank[r][m][f][row] for r in range(cp)], dim=0,
                                                    layout=layout) for f in per_rank[0][m]})
    return samples


def test_sample_order_is_independent_of_the_mesh():
    ref = _global_batch(2, G=8, mb=8, dp=1, cp=1)
    for dp, mb, cp, layout in [(2, 1, 2, "zigzag"), (4, 2, 1, "contiguous"), (8, 1, 4, "zigzag"), (2, 2, 8, "zigzag")]:
        got = _global_batch(2, G=8, mb=mb, dp=dp, cp=cp, layout=layout)
        assert len(got) == len(ref)
        for x, y in zip(ref, got):
            assert all(torch.equal(x[f], y[f]) for f in x), (dp, mb, cp, layout)


def test_data_state_is_consumed_samples_and_epochs_reshuffle():
    rd = reader(seq_len=64, G=4)
    n = rd.num_samples
    first = [rd.index.locate(k) for k in range(n)]
    second = [rd.index.locate(k) for k in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and first != second  # same samples, new order
    b1 = rd.micro_batches(5)
    b2 = rd.micro_batches_at(rd.consumed_samples(5))
    assert all(torch.equal(x[f], y[f]) for x, y in zip(b1, b2) for f in x)


def test_sample_index_is_cached_and_rebuilt_when_bad(tmp_path):
    cfg = DataConfig(**{**vars(MOCK), "index_dir": str(tmp_path)})
    rd = reader(cfg, seq_len=128, seed=3)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and "seq128-seed3" in files[0].name
    cached = np.load(files[0])
    np.testing.assert_array_equal(cached, rd.index.rows)
    again = reader(cfg, seq_len=128, seed=3)
    assert isinstance(again.index.rows, np.memmap)  # loaded, not rebuilt
    np.save(files[0], cached[:-1])  # a stale or damaged cache is replaced
    fixed = reader(cfg, seq_len=128, seed=3)
    np.testing.assert_array_equal(fixed.index.rows, cached)


def test_valid_split_is_disjoint(store):
    assert split_documents(10, "train", 0.2) == (0, 8) and split_documents(10, "valid", 0.2) == (8, 10)
    assert split_documents(10, "valid", 0.01) == (9, 10)
    base = dict(kind="files", path=str(store.path), valid_fraction=0.25)
    train, valid = reader(DataConfig(**base)), reader(DataConfig(**base, split="valid"))
    d0, _ = split_documents(store.num_documents, "valid", 0.25)
    boundary = int(store.doc_starts[d0])
    assert all(train.index.locate(k)[1] + 64 < boundary for k in range(train.num_samples))
    assert all(valid.index.locate(k)[1] >= boundary for k in range(valid.num_samples))


def test_mock_source_documents():
    src = MockSource(MOCK)
    assert src.num_tokens == MOCK.num_tokens
    lengths = np.diff(src.doc_starts)
    assert lengths.max() <= MOCK.max_doc_len and (lengths > 64).any() and lengths.min() >= 1
    doc = src.document(4)
    assert doc[-1] == src.eod_id and (doc[:-1] < src.eod_id).all()
    if doc.size > 2:  # an arithmetic progression mod (vocab - 1)
        steps = np.diff(doc[:-1]) % (MOCK.vocab_size - 1)
        assert (steps == steps[0]).all()
    np.testing.assert_array_equal(MockSource(MOCK).read(100, 900), src.read(100, 900))
    other = MockSource(DataConfig(**{**vars(MOCK), "mock_seed": 1}))
    assert not np.array_equal(other.read(0, 500), src.read(0, 500))


def test_describe_data_and_configs(store):
    info = describe_data(MOCK)
    assert (info.kind, info.vocab_size, info.num_tokens) == ("mock", 97, 40_000)
    assert describe_data(DataConfig(kind="files", path=str(store.path))).vocab_size == 65_001
    with pytest.raises(ValueError) as e:
        describe_data(DataConfig(kind="files", split="valid"))
    assert "data.path" in str(e.value) and "valid_fraction" in str(e.value)  # every problem at once
    for name in ("mock", "files"):
        yaml = OmegaConf.load(f"{CONFIG_DIR}/data/{name}.yaml")
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), yaml)  # keys match the schema
        assert OmegaConf.to_object(merged).kind == name
    as_dict = OmegaConf.merge(OmegaConf.structured(DataConfig), {"num_tokens": 5000})
    assert describe_data(OmegaConf.to_object(as_dict)).num_tokens == 5000  # converted once, at the entry
