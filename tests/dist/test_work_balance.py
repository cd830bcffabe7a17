"""Work balance in the trainer. ``data.balance=work`` (the step's samples dealt to dp ranks and
micro-batches by attention cost) gives the single-process run's loss and gradient norm at (2, 2, 1)
and (2, 1, 2), and logs the plan's ``work_dp_imbalance``, lower than the in-order one's.
``parallel.dynamic_cp`` (attention on cp' < cp ranks, the cp / cp' groups taking different
micro-batches) does too at (1, 4, 1) (cp' = 2, with either balance) and, with balance=work, at (2, 2, 1) (cp' = 1),
where a resume is also bit-identical."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from megaring.data import RankShard, build_batch_reader
from tests.dist.test_train_parity import RTOL
from tests.helpers.train_cfg import make_cfg

pytestmark = pytest.mark.slow

# Short documents (mean 24 tokens) in 64-token samples: sample costs differ, so the plan reorders.
SHORT_DOCS = ("data.mean_doc_len=24", "data.max_doc_len=160", "trainer.global_batch_size=8",
              "trainer.max_steps=4", "trainer.checkpoint_every=2",
              "data.valid_fraction=0.2", "eval.every=4", "eval.batches=1")


def _train(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


def balance_cfg(dp: int, cp: int, tp: int, balance: str, *extra: str):
    return make_cfg(dp=dp, cp=cp, tp=tp, zero_stage=1, micro_batch_size=1,
                    extra=(*SHORT_DOCS, f"data.balance={balance}", *extra))


# 64-token samples: 32 tokens per rank need cp' = 2, 64 need cp' = 1.
DYNAMIC_CP = ("parallel.dynamic_cp=true", "parallel.dynamic_cp_tokens=32")
DYNAMIC_CP1 = ("parallel.dynamic_cp=true", "parallel.dynamic_cp_tokens=64")


def plans(cfg, balance: str, n_steps: int):
    """Rank 0's view of each step's plan (every rank computes the same one)."""
    data = dataclasses.replace(cfg.data, balance=balance)
    rd = build_batch_reader(data, cfg.trainer.batch_shape(), RankShard(0, cfg.parallel.dp, 0, 1, "zigzag"),
                            seed=cfg.trainer.seed)
    return [rd.step_plan(rd.consumed_samples(s)) for s in range(n_steps)]


@pytest.fixture(scope="module")
def reference(pools, tmp_path_factory) -> list[dict]:
    (ref,) = pools(1).run(_train, balance_cfg(1, 1, 1, "none"), str(tmp_path_factory.mktemp("ref")))
    assert [m["step"] for m in steps(ref)] == [1, 2, 3, 4] and any("eval_loss" in m for m in ref)
    assert all(m["work_dp_imbalance"] == 1.0 for m in steps(ref))
    return ref


def check_loss(reference: list[dict], got: list[dict]) -> None:
    """Training steps' loss and gradient norm, and the evaluation's loss, against the reference."""
    for r, g in zip(reference, got, strict=True):
        if "eval_loss" in r:
            assert g["eval_loss"] == pytest.approx(r["eval_loss"], rel=RTOL), f"eval loss at step {g['step']}"
            continue
        assert g["loss"] == pytest.approx(r["loss"], rel=RTOL), f"loss at step {g['step']}"
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=RTOL), f"grad norm at step {g['step']}"


def steps(history: list[dict]) -> list[dict]:
    return [m for m in history if "eval_loss" not in m]


@pytest.mark.parametrize("layout", [(2, 2, 1), (2, 1, 2)], ids=lambda t: "dp{}cp{}tp{}".format(*t))
def test_balanced_dp_matches_single_process_and_logs_the_plans_imbalance(pools, reference, tmp_path, layout):
    cfg = balance_cfg(*layout, "work")
    work, none = plans(cfg, "work", 4), plans(cfg, "none", 4)
    assert any(not np.array_equal(w.slots, n.slots) for w, n in zip(work, none)), "the plan never reorders"
    per_rank = pools(int(np.prod(layout))).run(_train, cfg, str(tmp_path))
    assert all([m.get("loss") for m in r] == [m.get("loss") for m in per_rank[0]] for r in per_rank)
    check_loss(reference, per_rank[0])
    logged = [m["work_dp_imbalance"] for m in steps(per_rank[0])]
    assert logged == pytest.approx([p.dp_imbalance for p in work], rel=1e-12)
    assert all(w <= n.dp_imbalance + 1e-12 for w, n in zip(logged, none))
    assert np.mean(logged) < np.mean([n.dp_imbalance for n in none])
    assert all(m["effective_cp"] == layout[1] for m in steps(per_rank[0]))


@pytest.mark.parametrize("balance", ["none", "work"])
def test_dynamic_cp_on_half_the_ring_matches_single_process(pools, reference, tmp_path, balance):
    cfg = balance_cfg(1, 4, 1, balance, *DYNAMIC_CP)
    per_rank = pools(4).run(_train, cfg, str(tmp_path))
    assert all([m.get("loss") for m in r] == [m.get("loss") for m in per_rank[0]] for r in per_rank)
    check_loss(reference, per_rank[0])  # the evaluation runs on the cp' groups too
    assert all(m["effective_cp"] == 2 for m in steps(per_rank[0]))
    assert all(m["kv_bytes_sent_max"] > 0 for m in steps(per_rank[0]))  # the cp' = 2 ring still runs


def test_a_resume_with_balanced_dp_and_dynamic_cp_is_bit_identical(pools, reference, tmp_path):
    cfg = balance_cfg(2, 2, 1, "work", *DYNAMIC_CP1)
    per_rank = pools(4).run(_train, cfg, str(tmp_path))
    straight = per_rank[0]
    check_loss(reference, straight)
    assert all(m["effective_cp"] == 1 and m["kv_bytes_sent_max"] == 0 for m in steps(straight))  # no ring at cp'=1
    ckpts = tmp_path / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")  # as if the run had stopped after step 2
    resumed = pools(4).run(_train, cfg, str(tmp_path))[0]
    assert [m["step"] for m in steps(resumed)] == [3, 4]
    key = ("loss", "grad_norm", "work_dp_imbalance", "eval_loss")
    assert [[m.get(k) for k in key] for m in resumed] == [[m.get(k) for k in key] for m in straight[2:]]
