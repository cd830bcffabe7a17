"""``data.stages`` in the trainer: a curriculum of 512 then 2048 tokens (constant tokens per step,
``trainer.tokens_per_step``; a new ``rope_theta`` in stage 1) at cp=2, and with ``parallel.dynamic_cp``
(cp'=1 on the short stage, the whole cp ring on the long one), gives the single-process run's losses
and gradient norms; a resume inside stage 1 is bit-identical on the same layout and continues the
single-process run on another."""

from __future__ import annotations

import shutil

import pytest

from tests.dist.test_train_parity import RTOL
from tests.helpers.train_cfg import make_cfg

pytestmark = pytest.mark.slow

STAGES = "data.stages=[{steps: 2, seq_len: 512}, {steps: 3, seq_len: 2048, rope_theta: 50000.0}]"
KEYS = ("step", "loss", "grad_norm", "stage", "seq_len", "global_batch_size", "tokens_seen")


def _train(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


def staged_cfg(dp: int, cp: int, *extra: str):
    return make_cfg(dp=dp, cp=cp, extra=(STAGES, "trainer.tokens_per_step=4096", "trainer.max_steps=5",
                                         "trainer.checkpoint_every=3", *extra))


@pytest.fixture(scope="module")
def reference(pools, tmp_path_factory) -> list[dict]:
    (ref,) = pools(1).run(_train, staged_cfg(1, 1), str(tmp_path_factory.mktemp("ref")))
    assert [(m["stage"], m["seq_len"], m["global_batch_size"]) for m in ref] == \
        [(0, 512, 8), (0, 512, 8), (1, 2048, 2), (1, 2048, 2), (1, 2048, 2)]
    assert [m["tokens_seen"] for m in ref] == [4096 * s for s in range(1, 6)]
    return ref


def assert_matches(reference: list[dict], got: list[dict]) -> None:
    for r, g in zip(reference, got, strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=RTOL), f"loss at step {g['step']}"
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=RTOL), f"grad norm at step {g['step']}"
        assert [g[k] for k in KEYS[3:]] == [r[k] for k in KEYS[3:]]


def test_stages_at_cp2_match_single_process_and_resume_inside_stage_1(pools, reference, tmp_path):
    cfg = staged_cfg(1, 2)
    straight = pools(2).run(_train, cfg, str(tmp_path))[0]
    assert_matches(reference, straight)
    ckpts = tmp_path / "checkpoints"
    shutil.rmtree(ckpts / "step_00000005")
    (ckpts / "latest").write_text("step_00000003")  # as if the run had stopped after stage 1's first step
    resumed = pools(2).run(_train, cfg, str(tmp_path))[0]
    assert [m["step"] for m in resumed] == [4, 5]
    assert [[m[k] for k in KEYS] for m in resumed] == [[m[k] for k in KEYS] for m in straight[3:]]


def test_stages_with_dynamic_cp_switch_the_attention_ring(pools, reference, tmp_path):
    cfg = staged_cfg(2, 2, "parallel.dynamic_cp=true", "parallel.dynamic_cp_tokens=1024")
    got = pools(4).run(_train, cfg, str(tmp_path))[0]
    assert_matches(reference, got)
    assert [m["effective_cp"] for m in got] == [1, 1, 2, 2, 2]  # 512 tokens fit one rank of 1024; 2048 need two
    ckpts = tmp_path / "checkpoints"
    shutil.rmtree(ckpts / "step_00000005")
    (ckpts / "latest").write_text("step_00000003")
    moved = pools(2).run(_train, staged_cfg(1, 2), str(tmp_path))[0]  # inside stage 1, on another layout
    assert_matches(reference[3:], moved)


def test_stage_weights_change_the_sources_a_step_reads(pools, tmp_path):
    from tests.unit.test_data_mixture import write_store

    books, web = (write_store(tmp_path / n, 40, 120, s, vocab=256).path for n, s in (("books", 1), ("web", 2)))
    cfg = make_cfg(dp=2, extra=("data=mixture", f"+data.sources.books={{path: {books}, weight: 0.5}}",
                                f"+data.sources.web={{path: {web}, weight: 0.5}}", "trainer.global_batch_size=8",
                                "trainer.max_steps=4", "data.stages=[{steps: 2}, {steps: 2, seq_len: 128, "
                                "sources: {books: 1, web: 0}}]"))
    got = pools(2).run(_train, cfg, str(tmp_path / "run"))[0]
    assert [m["source_samples"] for m in got[2:]] == [{"books": 8}, {"books": 8}]
    assert all(set(m["source_samples"]) == {"books", "web"} and m["source_samples"]["web"] > 0 for m in got[:2])
    assert [m["seq_len"] for m in got] == [64, 64, 128, 128]
    assert got[2]["loss/books"] == pytest.approx(got[2]["loss"], rel=1e-9)
