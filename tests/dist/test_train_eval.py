"""Evaluation in the trainer: ``eval_loss`` at any layout equals the single-process model's mean
token loss on the same validation samples, and it is logged where tools read it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from tests.helpers.train_cfg import make_cfg

pytestmark = pytest.mark.slow

EVAL = ("data.valid_fraction=0.05", "eval.every=1", "eval.batches=2")


def _train(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


def reference_eval_loss(cfg) -> float:
    """The (1, 1) model of the run's seed on the first ``eval.batches`` validation batches, in one process."""
    from megaring.data import BatchShape, RankShard, build_eval_reader
    from megaring.model import ParallelContext, build_model, vocab_parallel_cross_entropy

    ctx = ParallelContext.single()
    model = build_model(cfg.model, ctx, seed=cfg.trainer.seed)
    reader = build_eval_reader(cfg.data, cfg.trainer.batch_shape(), RankShard())
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(cfg.eval.batches):
            for mb in reader.micro_batches(j):
                logits = model(mb["tokens"], mb["positions"], mb["segment_ids"])
                total += vocab_parallel_cross_entropy(logits, mb["labels"], ctx.tp).double().sum().item()
                count += int((mb["labels"] != -100).sum())
    assert count == cfg.eval.batches * cfg.trainer.global_batch_size * cfg.trainer.seq_len
    return total / count


@pytest.mark.parametrize("layout", [(1, 1, 1), (1, 2, 2), (2, 2, 1)], ids=lambda t: "dp{}cp{}tp{}".format(*t))
def test_eval_only_run_matches_the_single_process_model(pools, tmp_path, layout):
    dp, cp, tp = layout
    cfg = make_cfg(dp=dp, cp=cp, tp=tp, zero_stage=3 if dp * cp > 1 else 1, extra=(*EVAL, "trainer.max_steps=0"))
    per_rank = pools(dp * cp * tp).run(_train, cfg, str(tmp_path))
    assert all(r == per_rank[0] for r in per_rank), "ranks disagree on the evaluation"
    (record,) = per_rank[0]
    assert record["step"] == 0 and record["eval_ppl"] == pytest.approx(math.exp(record["eval_loss"]))
    assert record["eval_loss"] == pytest.approx(reference_eval_loss(cfg), rel=1e-5)
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line.pop("mesh") == {"dp": dp, "cp": cp, "ulysses": 1, "tp": tp} and line == record
    assert not (tmp_path / "checkpoints").exists()  # an eval-only run writes no checkpoint


def test_training_evaluates_every_n_steps_and_at_the_end(pools, tmp_path):
    cfg = make_cfg(dp=2, zero_stage=2, extra=(*EVAL, "eval.every=2", "trainer.max_steps=3"))
    history = pools(2).run(_train, cfg, str(tmp_path))[0]
    evals = [m for m in history if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 3]
    assert all(m["eval_loss"] > 0 and m["eval_tokens"] == 2 * 4 * 64 for m in evals)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["mesh"]["dp"] == 2 for m in logged)
    assert [m["step"] for m in logged] == [1, 2, 2, 3, 3]  # a training record, then its eval record


def test_eval_without_validation_data_is_a_config_error():
    from megaring.train.config_checks import collect_problems

    cfg = make_cfg(extra=("eval.every=5",))
    problems = collect_problems(cfg, 1)
    assert any("eval.every=5 needs validation data" in p and "data.valid_path" in p for p in problems)
    cfg.eval = dataclasses.replace(cfg.eval, batches=-1)
    assert any("eval.batches=-1 must be >= 0" in p for p in collect_problems(cfg, 1))
