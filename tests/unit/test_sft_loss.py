"""Loss masks at training time: the reader's labels at every layout, and the masked loss against
transformers' loss with ``labels=-100`` on the same tokens."""

import numpy as np
import pytest
import torch

from megaring.data import BatchShape, DataConfig, RankShard, build_batch_reader
from megaring.layout import shard_sequence
from megaring.model import IGNORE_INDEX, ParallelContext, count_valid_tokens, local_loss, vocab_parallel_cross_entropy
from tests.helpers.sft_data import masked_documents, write_masked_store

SEQ = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_masked_store(tmp_path_factory.mktemp("sft") / "store", n_docs=60)


def full_labels(store, start: int) -> np.ndarray:
    """Labels of the sample at ``start``, position by position: the next token, or IGNORE_INDEX when untrained."""
    tokens = store.read(start, start + SEQ + 1).astype(np.int64)
    trained = store.read_mask(start, start + SEQ + 1)
    return np.where(trained[1:], tokens[1:], IGNORE_INDEX)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_labels_are_masked_at_every_cp_shard(store, layout):
    cfg = DataConfig(kind="files", path=str(store.path))
    for cp in (1, 2, 4):
        readers = [build_batch_reader(cfg, BatchShape(SEQ, 4, 1), RankShard(0, 1, r, cp, layout), seed=0)
                   for r in range(cp)]
        for k in range(6):
            _, start = readers[0].index.locate(k)
            want = torch.from_numpy(full_labels(store, start))
            for r, rd in enumerate(readers):
                expect = shard_sequence(want, dim=0, rank=r, world_size=cp, layout=layout)
                np.testing.assert_array_equal(rd.read_sample(k)["labels"], expect.numpy())
    assert (want == IGNORE_INDEX).any() and (want != IGNORE_INDEX).any()


def test_the_reader_ignores_labels_as_the_loss_does():
    from megaring.data import reader

    assert reader.IGNORE_INDEX == IGNORE_INDEX


def test_balanced_layout_masks_the_same_labels(store):
    cfg = DataConfig(kind="files", path=str(store.path))
    readers = [build_batch_reader(cfg, BatchShape(SEQ, 4, 1), RankShard(0, 1, r, 2, "balanced"), seed=0)
               for r in range(2)]
    for k in range(6):
        _, start = readers[0].index.locate(k)
        samples = [rd.read_sample(k) for rd in readers]
        labels = np.concatenate([s["labels"] for s in samples])
        tokens = np.concatenate([s["tokens"] for s in samples])
        want = full_labels(store, start)
        assert sorted(labels.tolist()) == sorted(want.tolist())  # the same labels, in the plan's order
        assert tokens.size == SEQ


def test_a_shard_of_only_prompt_tokens_contributes_zero_not_nan():
    labels = torch.full((1, 16), IGNORE_INDEX)
    logits = torch.randn(1, 16, 8, requires_grad=True)
    loss = local_loss(vocab_parallel_cross_entropy(logits, labels, ParallelContext.single().tp),
                      count_valid_tokens(labels))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_masked_loss_equals_transformers_loss_with_ignored_labels(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megaring.hf import build_model_from_hf
    from tests.helpers.hf_models import llama_dir

    directory = llama_dir(tmp_path / "llama")
    docs, masks = masked_documents(2, 101, seed=1, prompt=(10, 30), answer=(4, 12))
    model, _ = build_model_from_hf(directory, ParallelContext.single())
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    for doc, mask in zip(docs, masks):  # one forward per conversation
        doc, mask = doc[: doc.size // 2 * 2], mask[: mask.size // 2 * 2]  # even length (zigzag layout)
        tokens = torch.from_numpy(doc).long()[None]  # (1, T)
        trained = torch.from_numpy(mask).bool()[None]
        labels = torch.where(trained[:, 1:], tokens[:, 1:], IGNORE_INDEX)  # (1, T - 1): next token or ignored
        labels = torch.cat([labels, torch.full((1, 1), IGNORE_INDEX)], dim=1)
        positions = torch.arange(tokens.shape[1])[None]
        with torch.no_grad():
            logits = model(tokens, positions)
            ours = local_loss(vocab_parallel_cross_entropy(logits, labels, ParallelContext.single().tp),
                              count_valid_tokens(labels))
            theirs = hf(input_ids=tokens, labels=torch.where(trained, tokens, -100)).loss
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
