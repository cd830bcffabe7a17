"""Evaluation samples (unshuffled, sharded like training) and the pre-flight data checks."""

import json
import shutil

import numpy as np
import pytest
import torch

from megaring.data import (
    BatchShape,
    DataConfig,
    RankShard,
    build_eval_reader,
    describe_data,
    eval_data_problems,
    tokenizer_vocab_problems,
    write_tokenized,
)
from megaring.data.sample_index import split_documents
from megaring.layout import unshard_sequence
from tests.unit.test_data_tokenizers import preprocess_docs, write_tokenizer_dir

MOCK = DataConfig(kind="mock", vocab_size=97, num_tokens=20_000, mean_doc_len=300, max_doc_len=5_000,
                  valid_fraction=0.25)


def eval_reader(cfg=MOCK, *, seq_len=64, G=4, mb=1, dp_rank=0, dp=1, cp_rank=0, cp=1, layout="zigzag"):
    return build_eval_reader(cfg, BatchShape(seq_len, G, mb), RankShard(dp_rank, dp, cp_rank, cp, layout))


def eval_batch(cfg, j, *, G, mb, dp, cp, seq_len=64):
    """Full samples of eval batch ``j`` in global order, rebuilt from every (dp, cp) rank's shards."""
    samples = []
    for dp_rank in range(dp):
        per_cp = [eval_reader(cfg, seq_len=seq_len, G=G, mb=mb, dp=dp, dp_rank=dp_rank, cp=cp, cp_rank=r)
                  .micro_batches(j) for r in range(cp)]
        for m in range(len(per_cp[0])):
            for row in range(mb):
                samples.append({f: unshard_sequence([per_cp[r][m][f][row] for r in range(cp)], dim=0,
                                                    layout="zigzag") for f in per_cp[0][m]})
    return samples


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("eval"), np.random.default_rng(5)
    docs = lambda n: [np.append(rng.integers(0, 90, rng.integers(1, 120)), 99) for _ in range(n)]  # noqa: E731
    train = write_tokenized(root / "train", docs(200), vocab_size=100, eod_id=99)
    valid = write_tokenized(root / "valid", docs(60), vocab_size=100, eod_id=99)
    other = write_tokenized(root / "other", docs(60), vocab_size=120, eod_id=99)
    return train, valid, other


def test_unshuffled_order_is_the_stream(stores):
    train, valid, _ = stores
    for cfg, source, base in [
        (MOCK, None, None),
        (DataConfig(kind="files", path=str(train.path), valid_path=str(valid.path)), valid, 0),
    ]:
        rd = eval_reader(cfg, G=4, mb=4)
        source = source or rd.reader.source
        if base is None:
            base = int(source.doc_starts[split_documents(source.num_documents, "valid", 0.25)[0]])
        assert rd.num_batches == rd.num_samples // 4 > 1
        for j in range(rd.num_batches):
            (batch,) = rd.micro_batches(j)
            for row in range(4):
                i = 4 * j + row
                stream = source.read(base + i * 64, base + i * 64 + 65).astype(np.int64)
                np.testing.assert_array_equal(batch["tokens"][row].numpy(), stream[:-1])
                np.testing.assert_array_equal(batch["labels"][row].numpy(), stream[1:])
        with pytest.raises(IndexError, match="outside the"):
            rd.micro_batches(rd.num_batches)


@pytest.mark.parametrize("kind", ["mock", "valid_path"])
def test_dp_cp_sharding_reassembles_to_the_same_samples(stores, kind):
    files = DataConfig(kind="files", path=str(stores[0].path), valid_path=str(stores[1].path))
    cfg = MOCK if kind == "mock" else files
    for j in (0, 1):
        ref = eval_batch(cfg, j, G=4, mb=4, dp=1, cp=1)
        got = eval_batch(cfg, j, G=4, mb=1, dp=2, cp=2)
        assert len(got) == len(ref) == 4
        for x, y in zip(ref, got):
            assert set(x) == {"tokens", "labels", "positions", "segment_ids"}
            assert all(torch.equal(x[f], y[f]) for f in x)


def test_errors_too_short_and_no_validation_data(stores):
    with pytest.raises(ValueError, match=r"fewer than one eval batch of 1000.*data\.valid_fraction"):
        eval_reader(G=1000)
    with pytest.raises(ValueError, match=r"data\.valid_path.*data\.valid_fraction"):
        eval_reader(DataConfig(kind="mock", num_tokens=20_000))
    both = DataConfig(kind="files", path=str(stores[0].path), valid_path=str(stores[1].path), valid_fraction=0.1)
    with pytest.raises(ValueError, match="not both"):
        eval_reader(both)
    assert any("not both" in p for p in eval_data_problems(both))


def test_eval_data_problems(stores, tmp_path):
    train, valid, other = stores
    good = DataConfig(kind="files", path=str(train.path), valid_path=str(valid.path))
    assert eval_data_problems(good) == [] and eval_data_problems(MOCK) == []
    bad = eval_data_problems(DataConfig(kind="files", path=str(train.path), valid_path=str(other.path)))
    assert len(bad) == 1 and "vocab_size 120" in bad[0] and str(train.path) in bad[0]
    assert "megaring-preprocess" in bad[0]
    missing = eval_data_problems(DataConfig(kind="files", path=str(train.path), valid_path=str(tmp_path / "x")))
    assert len(missing) == 1 and "does not exist" in missing[0]


def test_tokenizer_vocab_problems(tmp_path):
    tok = write_tokenizer_dir(tmp_path / "ckpt", extra={"config.json": {"bos_token_id": 0, "eos_token_id": 1}})
    _, out = preprocess_docs(tmp_path, tok, workers=0)
    info = describe_data(DataConfig(kind="files", path=str(out)))
    assert tokenizer_vocab_problems(info, 300, checkpoint_dir=str(tok)) == []
    assert tokenizer_vocab_problems(describe_data(MOCK), 97, checkpoint_dir=str(tok)) == []
    (small,) = tokenizer_vocab_problems(info, 256)
    assert "vocab_size 300, more than the model's 256" in small and str(out) in small
    # A checkpoint whose config ends documents differently and whose tokenizer.json is another one.
    other = tmp_path / "other"
    shutil.copytree(tok, other)
    (other / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [3]}))
    write_tokenizer_dir(tmp_path / "x", bos_template=False)
    shutil.copy(tmp_path / "x" / "tokenizer.json", other / "tokenizer.json")
    problems = tokenizer_vocab_problems(info, 300, checkpoint_dir=str(other))
    assert len(problems) == 3, problems
    assert all(f"tokenizer.model={other}" in p for p in problems)
    assert str(out / "tokenizer.json") in problems[0] and str(other / "tokenizer.json") in problems[0]
    assert "eos_token_id [3]" in problems[1] and "bos_token_id 2" in problems[2]
    (nocfg,) = tokenizer_vocab_problems(info, 300, checkpoint_dir=str(tmp_path / "x"))
    assert "has no config.json" in nocfg
