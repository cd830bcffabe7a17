"""``data.stages`` and ``trainer.tokens_per_step`` (megaring.train.stages): the stages a config
makes, their accounting, the per-stage configs, and every bad input listed in one config error."""

from __future__ import annotations

import pytest

from megaring.errors import ConfigError
from megaring.train.config_checks import validate
from megaring.train.stages import build_stages, stage_at, stage_seed
from tests.helpers.train_cfg import make_cfg
from tests.unit.test_data_mixture import write_store

STAGES = ("data.stages=[{steps: 2, seq_len: 64}, {steps: 3, seq_len: 256, rope_theta: 40000.0, "
          "rope_scaling: {rope_type: linear, factor: 4.0}}]")


def test_stages_account_samples_tokens_and_steps():
    cfg = make_cfg(extra=(STAGES, "trainer.tokens_per_step=1024", "trainer.max_steps=5"))
    first, second = build_stages(cfg)
    assert (first.first, first.last, first.seq_len, first.global_batch_size) == (1, 2, 64, 16)
    assert (second.first, second.last, second.seq_len, second.global_batch_size) == (3, 5, 256, 4)
    assert second.samples_before == 32 and second.tokens_before == 2048
    assert second.samples_after(4) == 32 + 8 and second.tokens_after(5) == 5 * 1024
    assert second.local_step(3) == 0 and [stage_at([first, second], s).index for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert first.cfg.model.rope_theta == cfg.model.rope_theta and first.cfg.model.rope_scaling is None
    assert second.cfg.model.rope_theta == 40000.0 and second.cfg.model.rope_scaling == {"rope_type": "linear",
                                                                                          "factor": 4.0}
    assert second.cfg.data.stages == [] and cfg.trainer.max_steps == second.cfg.trainer.max_steps


def test_no_stages_is_one_stage_of_the_trainers_values():
    cfg = make_cfg(extra=("trainer.max_steps=7",))
    (only,) = build_stages(cfg)
    assert (only.first, only.last, only.seq_len, only.global_batch_size) == (1, 7, 64, 4)
    assert only.cfg == cfg and stage_seed(cfg.trainer.seed, 0) == cfg.trainer.seed
    assert len({stage_seed(1234, i) for i in range(4)}) == 4
    (fixed,) = build_stages(make_cfg(extra=("trainer.tokens_per_step=512",)))
    assert fixed.global_batch_size == 8  # tokens_per_step / seq_len, also without stages


def test_stage_weights_replace_the_mixtures_and_zero_leaves_a_source_out(tmp_path):
    books, web = (write_store(tmp_path / n, 20, 120, s, vocab=256).path for n, s in (("books", 1), ("web", 2)))
    cfg = make_cfg(extra=("data=mixture", f"+data.sources.books={{path: {books}, weight: 0.5}}",
                          f"+data.sources.web={{path: {web}, weight: 0.5}}", "trainer.max_steps=3",
                          "data.stages=[{steps: 1}, {steps: 2, sources: {books: 0.8, web: 0}}]"))
    validate(cfg, world_size=1)
    first, second = build_stages(cfg)
    assert {k: v["weight"] for k, v in first.cfg.data.sources.items()} == {"books": 0.5, "web": 0.5}
    assert {k: v["weight"] for k, v in second.cfg.data.sources.items()} == {"books": 0.8}


def test_bad_stages_are_one_config_error_listing_each(tmp_path):
    cfg = make_cfg(cp=4, extra=("data.stages=[{steps: 2, seq_len: 64, colour: red}, {steps: 0, seq_len: 100}, "
                                "{steps: 3, seq_len: 96, sources: {books: 1}, rope_theta: -1.0}]",
                                "trainer.tokens_per_step=6144", "trainer.max_steps=9"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4)
    msg = str(err.value)
    for line in ("data.stages[0]: unknown keys ['colour']", "data.stages[1].steps must be an integer >= 1, got 0",
                 "trainer.tokens_per_step=6144 is not a multiple of data.stages[1].seq_len=100",
                 "data.stages[2].sources: stage weights need data.kind=mixture",
                 "data.stages[2].rope_theta must be a positive number, got -1.0"):
        assert line in msg, msg
    # structure fine: the steps must add up, and each stage's seq_len must suit the layout (zigzag at cp=4: 8 | L)
    cfg = make_cfg(cp=4, extra=("data.stages=[{steps: 2, seq_len: 64}, {steps: 2, seq_len: 100}]",
                                "trainer.max_steps=5"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4)
    assert "the steps of data.stages add up to 4, not trainer.max_steps=5" in str(err.value)
    cfg = make_cfg(cp=4, extra=("data.stages=[{steps: 2, seq_len: 64}, {steps: 3, seq_len: 100}]",
                                "trainer.max_steps=5"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4)
    msg = str(err.value)
    assert "data.stages[1] (seq_len 100, global batch 4): " in msg and "data.stages[0]" not in msg, msg


def test_the_prolong_stages_of_configs_data_compose_into_two_stages():
    from pathlib import Path

    from megaring.train.stages import structure_problems
    from tests.helpers.train_cfg import compose_cfg

    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = compose_cfg("model=tiny", "data=prolong_stages", "trainer.max_steps=1000", "trainer.tokens_per_step=4194304",
                      f"hydra.searchpath=[file://{configs}]")
    assert structure_problems(cfg) == []
    first, second = build_stages(cfg)
    assert (first.seq_len, first.global_batch_size, second.seq_len, second.global_batch_size) == (65536, 64, 524288, 8)
    assert second.cfg.model.rope_theta == 128000000.0 and second.cfg.data.sources["books"]["weight"] == 0.35
