"""The trainer at every (dp, cp, tp) layout and ZeRO stage against the single-process run.

``data=mock model=tiny``, seq_len 64, global batch 4, 3 steps, float32 on gloo. The reference
(1, 1, 1) run happens once per module; each layout runs ``megaring.train.trainer.train`` in a
module-scoped worker pool (the real trainer, its DeepSpeed engine and mpu, the real data reader).
Checked per step: the global mean loss and the global gradient norm equal the reference within
1e-4 relative, and every rank reports the same loss. Stage 3 partitions every parameter
(persistence threshold 0), so cp ranks must really share ZeRO shards and gradients.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers.train_cfg import make_cfg

RTOL = 1e-4
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 2, 2)]
# Every layout with the stages that shard over its dp x cp (stage 3 everywhere), and every stage on
# several layouts: 12 runs instead of 18, so that the whole suite stays near 15 minutes.
CASES = [(layout, stage) for layout in LAYOUTS for stage in (1, 2, 3)
         if stage == 3 or (stage == 1) == (LAYOUTS.index(layout) % 2 == 0)]


def _train(rank: int, world_size: int, cfg, run_dir: str) -> list[tuple[float, float]]:
    from megaring.train.trainer import train

    return [(m["loss"], m["grad_norm"]) for m in train(cfg, run_dir)]


def layout_cfg(dp: int, cp: int, tp: int, zero_stage: int, **parallel):
    # dp=1 layouts take micro-batches of 2: accumulation over 2 steps, like dp=2 with micro 1.
    cfg = make_cfg(dp=dp, cp=cp, tp=tp, zero_stage=zero_stage, micro_batch_size=2 if dp == 1 else 1)
    cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
    return cfg


@pytest.fixture(scope="module")
def reference(pools, tmp_path_factory) -> list[tuple[float, float]]:
    cfg = make_cfg(dp=1, cp=1, tp=1, zero_stage=0, micro_batch_size=1)  # 4 accumulation steps
    (ref,) = pools(1).run(_train, cfg, str(tmp_path_factory.mktemp("ref")))
    assert len(ref) == 3 and all(loss > 0 and norm > 0 for loss, norm in ref)
    return ref


def check_against(reference, per_rank: list[list[tuple[float, float]]]) -> None:
    first = per_rank[0]
    assert all(r == first for r in per_rank), "ranks disagree on the logged loss / grad norm"
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(first, reference), start=1):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"loss at step {step}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"grad norm at step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("layout,zero_stage", CASES, ids=lambda v: "dp{}cp{}tp{}".format(*v) if isinstance(v, tuple)
                         else f"zero{v}")
def test_layout_matches_single_process(pools, reference, tmp_path, layout, zero_stage):
    cfg = layout_cfg(*layout, zero_stage)
    world = layout[0] * layout[1] * layout[2]
    check_against(reference, pools(world).run(_train, cfg, str(tmp_path)))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_sequence_parallel_matches_single_process(pools, reference, tmp_path, zero_stage):
    """Megatron sequence parallelism, and ZeRO off (our own tp-aware gradient norm)."""
    cfg = layout_cfg(2, 2, 2, zero_stage, sequence_parallel=True)
    check_against(reference, pools(8).run(_train, cfg, str(tmp_path)))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_bfloat16_computes_in_bfloat16_and_tracks_float32(pools, reference, tmp_path, zero_stage):
    """``trainer.dtype=bfloat16`` (the CUDA default) on CPU: forward in bf16 (step 1 differs from
    float32, which it would not if a stage left the weights in float32), losses within 1e-2."""
    cfg = layout_cfg(2, 1, 1, zero_stage)
    cfg.trainer = dataclasses.replace(cfg.trainer, dtype="bfloat16")
    per_rank = pools(2).run(_train, cfg, str(tmp_path))
    assert per_rank[0] == per_rank[1]
    assert per_rank[0][0][0] != reference[0][0]
    for (loss, _), (ref_loss, _) in zip(per_rank[0], reference):
        assert loss == pytest.approx(ref_loss, rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, 2, 1), (1, 4, 1), (1, 2, 2)], ids=lambda t: "dp{}cp{}tp{}".format(*t))
def test_balanced_layout_matches_single_process(pools, reference, tmp_path, layout):
    cfg = layout_cfg(*layout, 1, layout="balanced")
    per_rank = pools(layout[0] * layout[1] * layout[2]).run(_train, cfg, str(tmp_path))
    check_against(reference, per_rank)


def _train_metrics(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


@pytest.mark.slow
def test_sliding_window_and_attention_metrics(pools, tmp_path):
    """model.sliding_window=8 at cp=2 (balanced) against one process; the step metrics report the
    attention work balance and the K/V bytes each rank sent."""
    ref_cfg = make_cfg(dp=1, cp=1, tp=1, zero_stage=0, micro_batch_size=1)
    ref_cfg.model = dataclasses.replace(ref_cfg.model, sliding_window=8)
    (ref,) = pools(1).run(_train_metrics, ref_cfg, str(tmp_path / "ref"))
    cfg = layout_cfg(1, 2, 1, 1, layout="balanced")
    cfg.model = dataclasses.replace(cfg.model, sliding_window=8)
    got = pools(2).run(_train_metrics, cfg, str(tmp_path / "cp2"))[0]
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=RTOL)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=RTOL)
        assert 1.0 <= g["attn_imbalance"] < 1.5 and g["kv_bytes_sent_max"] >= g["kv_bytes_sent_mean"] > 0
        assert r["kv_bytes_sent_max"] == 0 and r["attn_imbalance"] == 1.0
    assert ref[0]["tflops"] < make_cfg_dense_tflops(ref[0], ref_cfg)


def make_cfg_dense_tflops(metrics: dict, cfg) -> float:
    """TFLOP/s the step would report counting dense causal attention over the whole sample."""
    from megaring.model import model_flops_per_token

    t = cfg.trainer
    return metrics["tokens_per_s"] * model_flops_per_token(cfg.model, t.seq_len) / 1e12
