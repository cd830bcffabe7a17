"""Instruction tuning in the trainer: a store with a loss mask (long untrained prompts, short trained
answers) at (dp, cp, tp) = (1, 2, 1) (zigzag and balanced) and (1, 2, 2) with sequence parallelism
gives the loss, gradient norm and eval loss of the single-process run; a global batch without a
trained token is skipped; a resume is bit-identical; a chat checkpoint exports with its template."""

from __future__ import annotations

import dataclasses
import math

import pytest

from megaring.data import RankShard, build_batch_reader
from tests.dist.test_train_parity import check_against
from tests.helpers.sft_data import write_masked_store
from tests.helpers.train_cfg import make_cfg

pytestmark = pytest.mark.slow


def _train(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


def _loss_norm(rank: int, world_size: int, cfg, run_dir: str) -> tuple[list[tuple[float, float]], list[tuple]]:
    """The training steps' (loss, grad norm) and the evaluations' (eval_loss, eval_tokens)."""
    history = _train(rank, world_size, cfg, run_dir)
    return ([(m["loss"], m["grad_norm"]) for m in history if "eval_loss" not in m],
            [(m["eval_loss"], m["eval_tokens"]) for m in history if "eval_loss" in m])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_masked_store(tmp_path_factory.mktemp("sft") / "store", n_docs=80)


EVAL = ("data.valid_fraction=0.2", "eval.every=3", "eval.batches=1")


def sft_cfg(store, dp=1, cp=1, tp=1, zero_stage=1, extra=(), **parallel):
    cfg = make_cfg(dp=dp, cp=cp, tp=tp, zero_stage=zero_stage, micro_batch_size=2,
                   extra=("data=files", f"data.path={store.path}", *extra))
    cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
    return cfg


def some_cp_shard_is_prompt_only(cfg) -> bool:
    """True when a cp=2 shard of a trained sample holds no trained label (the case that gave NaN elsewhere)."""
    shape = cfg.trainer.batch_shape()
    readers = [build_batch_reader(cfg.data, shape, RankShard(0, 1, r, 2, "zigzag"), seed=cfg.trainer.seed)
               for r in range(2)]
    for step in range(cfg.trainer.max_steps):
        per_rank = [[(mb["labels"] != -100).sum(dim=1) for mb in rd.micro_batches(step)] for rd in readers]
        if any((c == 0).any() for rank in per_rank for c in rank):
            return True
    return False


@pytest.fixture(scope="module")
def reference(pools, store, tmp_path_factory):
    (ref,) = pools(1).run(_train, sft_cfg(store, zero_stage=0, extra=EVAL), str(tmp_path_factory.mktemp("ref")))
    steps, (last,) = ref[:3], ref[3:]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in steps)
    tokens = steps[0]["tokens_seen"]
    assert all(0 < m["trained_tokens"] < tokens for m in steps)  # the mask removed prompt labels
    assert 0 < last["eval_tokens"] < tokens and math.isfinite(last["eval_loss"])  # eval counts trained tokens only
    return [(m["loss"], m["grad_norm"]) for m in steps], [(last["eval_loss"], last["eval_tokens"])]


@pytest.mark.parametrize("layout,parallel", [((1, 2, 1), {}), ((1, 2, 2), {"sequence_parallel": True}),
                                             ((1, 2, 1), {"layout": "balanced"}), ((1, 2, 1), {"ulysses": 2})],
                         ids=["dp1cp2tp1", "dp1cp2tp2-sp", "dp1cp2tp1-balanced", "dp1cp2tp1-ulysses2"])
def test_masked_loss_and_grad_norm_match_single_process(pools, store, reference, tmp_path, layout, parallel):
    cfg = sft_cfg(store, *layout, zero_stage=3, extra=EVAL, **parallel)
    assert some_cp_shard_is_prompt_only(cfg)
    per_rank = pools(layout[1] * layout[2]).run(_loss_norm, cfg, str(tmp_path))
    check_against(reference[0], [steps for steps, _ in per_rank])
    ((eval_loss, eval_tokens),) = per_rank[0][1]
    assert eval_tokens == reference[1][0][1]  # no inflation by cp: the same trained-token count ...
    assert eval_loss == pytest.approx(reference[1][0][0], rel=1e-5)  # ... and the same mean


def test_a_global_batch_without_trained_tokens_is_skipped_and_counted(pools, tmp_path):
    empty = write_masked_store(tmp_path / "store", n_docs=40, trained=False)
    cfg = sft_cfg(empty)
    cfg.trainer = dataclasses.replace(cfg.trainer, max_steps=2)
    (history,) = pools(1).run(_train, cfg, str(tmp_path / "run"))
    assert [m["skipped_empty"] for m in history] == [1, 2]
    assert all(m["trained_tokens"] == 0 and m["loss"] == 0.0 and m["grad_norm"] is None for m in history)


def test_chat_store_from_init_from_trains_and_exports_the_chat_files(pools, tmp_path):
    """End to end: a chat checkpoint's store, one step from model.init_from, export; the exported
    directory renders conversations exactly as the original and keeps its generation config and ids."""
    import json

    import transformers

    from megaring.cli.export import ExportConfig, export
    from megaring.data import PreprocessConfig, TokenizerConfig
    from megaring.data.preprocess import preprocess
    from tests.helpers.hf_models import llama_dir
    from tests.unit.test_data_chat import CHATML, CONVERSATION, chat_dir

    hf = llama_dir(tmp_path / "hf", vocab=320)
    chat_dir(hf, CHATML, as_file=True)  # ids: <s> 0, </s> 1, <pad> 2
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}))
    generation = json.loads((hf / "generation_config.json").read_text())
    (hf / "generation_config.json").write_text(json.dumps({**generation, "bos_token_id": 0, "eos_token_id": 1, "temperature": 0.6}))
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(12)))
    preprocess(PreprocessConfig(input=str(corpus), output=str(tmp_path / "store"), progress=False, workers=0,
                                tokenizer=TokenizerConfig(model=str(hf))))
    cfg = make_cfg(extra=("data=files", f"data.path={tmp_path / 'store'}", f"model.init_from={hf}",
                          "trainer.max_steps=1"))
    (history,) = pools(1).run(_train, cfg, str(tmp_path / "run"))
    assert 0 < history[0]["trained_tokens"] < cfg.trainer.global_batch_size * cfg.trainer.seq_len
    out = export(ExportConfig(input=str(tmp_path / "run"), output=str(tmp_path / "hf_out")))
    render = [transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(CONVERSATION, tokenize=False)
              for d in (hf, out)]
    assert render[0] == render[1] and "<|im_start|>assistant" in render[1]
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 2
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6


def test_resume_mid_epoch_of_a_chat_store_is_bit_identical(pools, store, tmp_path):
    import shutil

    cfg = sft_cfg(store, extra=("trainer.max_steps=4", "trainer.checkpoint_every=2"))
    (straight,) = pools(1).run(_train, cfg, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")  # as if the run had stopped after step 2
    (resumed,) = pools(1).run(_train, cfg, str(tmp_path))
    assert [m["step"] for m in resumed] == [3, 4]
    key = [(m["loss"], m["grad_norm"], m["trained_tokens"]) for m in straight[2:]]
    assert [(m["loss"], m["grad_norm"], m["trained_tokens"]) for m in resumed] == key  # bit-identical on CPU
