"""The model and the trainer with parallel.ulysses against the single-process references.

Model: cp=4 as 2 (Ulysses) x 2 (ring), pure Ulysses, and cp=2 as Ulysses 2 with tp=2 and sequence
parallelism, on 4 gloo ranks, checked as in test_model_parity (logits, loss, every gradient,
weights), including kv heads per tp rank fewer than the Ulysses group (replicated, not expanded).
Training: the real trainer at Ulysses layouts under ZeRO-2 and ZeRO-3, loss and grad norm within
1e-4 relative of the (1, 1, 1) run (test_train_parity's reference).
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.dist.test_model_parity import TINY, WORLD, _check, _run_case, packed_batch, reference
from tests.dist.test_train_parity import _train, check_against, layout_cfg
from tests.dist.test_train_parity import reference as train_reference  # noqa: F401 - the fixture

CASES = [(4, 2, 1, False), (4, 4, 1, False), (2, 2, 2, True)]  # (cp, ulysses, tp, sp)


def _ulysses_case(rank, world, cfg, cp, ulysses, tp, sp, packed, batch, ref):
    return _run_case(rank, world, cfg, cp, tp, sp, packed, batch, ref, ulysses=ulysses)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_ulysses_model_matches_single_process(pools, packed):
    batch = packed_batch()
    ref = reference(TINY, batch, packed)
    for cp, ulysses, tp, sp in CASES:
        results = pools(WORLD).run(_ulysses_case, TINY, cp, ulysses, tp, sp, packed, batch, ref)
        _check(results, f"cp={cp} ulysses={ulysses} tp={tp} sp={sp} packed={packed}")


def test_kv_heads_fewer_than_ulysses(pools):
    """n_kv_heads=2 at tp=2: one kv head per tp rank, replicated to the 2 Ulysses ranks; and MQA at
    pure Ulysses 4 (one kv head sent to all four)."""
    batch = packed_batch()
    for n_kv, (cp, ulysses, tp, sp) in [(2, (2, 2, 2, True)), (1, (4, 4, 1, False))]:
        cfg = dataclasses.replace(TINY, n_kv_heads=n_kv)
        ref = reference(cfg, batch, packed=True)
        results = pools(WORLD).run(_ulysses_case, cfg, cp, ulysses, tp, sp, True, batch, ref)
        _check(results, f"n_kv_heads={n_kv} cp={cp} ulysses={ulysses} tp={tp}")


@pytest.mark.slow
@pytest.mark.parametrize("layout,zero_stage", [((1, 4, 1, 2, False), 2), ((1, 2, 2, 2, True), 3)],
                         ids=["cp4u2-zero2", "cp2u2tp2sp-zero3"])
def test_training_matches_single_process(pools, train_reference, tmp_path, layout, zero_stage):  # noqa: F811
    dp, cp, tp, ulysses, sp = layout
    cfg = layout_cfg(dp, cp, tp, zero_stage, ulysses=ulysses, sequence_parallel=sp)
    check_against(train_reference, pools(dp * cp * tp).run(_train, cfg, str(tmp_path)))
