"""A weighted mixture of three stores in the trainer: the single-process run's losses (overall and per
source, ``loss/<name>``) and evaluation (``eval_loss/<name>`` of the sources with validation data) at
(2, 2, 1) and (1, 2, 2), ``source_samples`` every step, a resume mid-run bit-identical, bad sources
refused at once."""

from __future__ import annotations

import shutil

import pytest

from megaring.errors import ConfigError
from megaring.train.config_checks import validate
from tests.dist.test_train_parity import RTOL
from tests.helpers.train_cfg import make_cfg
from tests.unit.test_data_mixture import write_store

pytestmark = pytest.mark.slow


def _train(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return {name: write_store(root / name, n, 120, seed, vocab=256).path
            for name, n, seed in (("books", 20, 1), ("code", 80, 2), ("web", 400, 3))}


def mixture_cfg(stores, dp: int, cp: int, tp: int, *extra: str):
    sources = [f"+data.sources.{name}={{path: {stores[name]}, weight: {w}{held_out}}}"
               for name, w, held_out in (("books", 0.4, ""), ("code", 0.35, ", valid_fraction: 0.2"),
                                         ("web", 0.25, ", valid_fraction: 0.1"))]
    return make_cfg(dp=dp, cp=cp, tp=tp, zero_stage=1, micro_batch_size=1,
                    extra=("data=mixture", *sources, "trainer.global_batch_size=8", "trainer.max_steps=4",
                           "trainer.checkpoint_every=2", "eval.every=4", "eval.batches=1", *extra))


def steps(history: list[dict]) -> list[dict]:
    return [m for m in history if "eval_loss" not in m]


@pytest.fixture(scope="module")
def reference(pools, stores, tmp_path_factory) -> list[dict]:
    (ref,) = pools(1).run(_train, mixture_cfg(stores, 1, 1, 1), str(tmp_path_factory.mktemp("ref")))
    assert [m["step"] for m in steps(ref)] == [1, 2, 3, 4]
    (evaluation,) = [m for m in ref if "eval_loss" in m]  # the sources with validation data, and all of them
    assert {k for k in evaluation if k.startswith("eval_loss/")} == {"eval_loss/code", "eval_loss/web"}
    both = (evaluation["eval_loss/code"] + evaluation["eval_loss/web"]) / 2  # one batch of 8 x 64 labels each
    assert evaluation["eval_loss"] == pytest.approx(both, rel=1e-12) and evaluation["eval_tokens"] == 2 * 8 * 64
    assert all(sum(m["source_samples"].values()) == 8 and set(m["source_samples"]) == {"books", "code", "web"}
               for m in steps(ref))
    for m in steps(ref):  # the per-source losses weigh back to the step's loss (every sample has seq_len labels)
        mean = sum(m[f"loss/{n}"] * c for n, c in m["source_samples"].items() if c) / 8
        assert mean == pytest.approx(m["loss"], rel=1e-9)
        assert all((m[f"loss/{n}"] is None) == (c == 0) for n, c in m["source_samples"].items())
    return ref


@pytest.mark.parametrize("layout", [(2, 2, 1), (1, 2, 2)], ids=lambda t: "dp{}cp{}tp{}".format(*t))
def test_a_mixture_matches_single_process(pools, stores, reference, tmp_path, layout):
    per_rank = pools(layout[0] * layout[1] * layout[2]).run(_train, mixture_cfg(stores, *layout), str(tmp_path))
    for r, g in zip(reference, per_rank[0], strict=True):
        if "eval_loss" in r:
            for k in ("eval_loss", "eval_loss/code", "eval_loss/web"):
                assert g[k] == pytest.approx(r[k], rel=RTOL), k
            continue
        assert g["loss"] == pytest.approx(r["loss"], rel=RTOL), f"loss at step {g['step']}"
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=RTOL), f"grad norm at step {g['step']}"
        assert g["source_samples"] == r["source_samples"]
        for name in ("books", "code", "web"):
            assert g[f"loss/{name}"] == pytest.approx(r[f"loss/{name}"], rel=RTOL), f"loss/{name} at step {g['step']}"


def test_a_resume_inside_a_mixture_is_bit_identical(pools, stores, reference, tmp_path):
    cfg = mixture_cfg(stores, 2, 1, 1)
    straight = pools(2).run(_train, cfg, str(tmp_path))[0]
    ckpts = tmp_path / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")  # as if the run had stopped after step 2
    resumed = pools(2).run(_train, cfg, str(tmp_path))[0]
    assert [m["step"] for m in steps(resumed)] == [3, 4]
    key = ("loss", "grad_norm", "source_samples", "loss/books", "loss/code", "loss/web", "eval_loss/web")
    assert [[m.get(k) for k in key] for m in resumed] == [[m.get(k) for k in key] for m in straight[2:]]


def test_bad_sources_are_config_errors_listing_each(stores, tmp_path):
    bad = write_store(tmp_path / "big_vocab", 20, 100, 5, vocab=300).path
    cfg = make_cfg(extra=("data=mixture", f"+data.sources.books={{path: {stores['books']}, weight: 1}}",
                          f"+data.sources.big={{path: {bad}, weight: 1}}",
                          f"+data.sources.gone={{path: {tmp_path / 'nothing'}, weight: 1}}", "eval.every=2"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    msg = str(err.value)
    assert "data.sources.gone" in msg and "data.sources.big" in msg and "tokenized differently" in msg
    assert "eval.every with data=mixture needs validation data: set data.sources.<name>.valid_fraction" in msg
    cfg = make_cfg(extra=("data=mixture", f"+data.sources.books={{path: {stores['books']}, weight: 0}}",
                          "+data.sources.web={weight: 1}"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    msg = str(err.value)
    for line in ("data.sources.books.weight must be a positive number, got 0",
                 "data.sources.web.path must name a directory"):
        assert line in msg, msg
