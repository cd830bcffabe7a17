"""``eval.tasks=[position_loss]``: the mean loss per position bucket of the held-out samples is the
same at every layout (cp with zigzag and balanced, dp, tp) as on one process, its buckets weigh back
to ``eval_loss``, and bad settings are config errors listing each."""

from __future__ import annotations

import numpy as np
import pytest

from megaring.errors import ConfigError
from megaring.train.config_checks import validate
from megaring.train.eval_loss import position_edges
from tests.helpers.train_cfg import make_cfg

pytestmark = pytest.mark.slow

EDGES = position_edges(256)  # 0, 1, 2, 4, ..., 128, 256


def _evaluate(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


def eval_cfg(dp: int = 1, cp: int = 1, tp: int = 1, *extra: str):
    return make_cfg(dp=dp, cp=cp, tp=tp, extra=("trainer.seq_len=256", "trainer.global_batch_size=4",
                                                "trainer.max_steps=0", "data.valid_fraction=0.05",
                                                "data.mean_doc_len=96", "eval.every=1", "eval.batches=2",
                                                "eval.tasks=[position_loss]", *extra))


def buckets(record: dict) -> dict[str, tuple[float | None, int]]:
    return {f"{a}-{b}": (record[f"eval/position_loss/{a}-{b}"], record[f"eval/position_tokens/{a}-{b}"])
            for a, b in zip(EDGES, EDGES[1:])}


@pytest.fixture(scope="module")
def reference(pools, tmp_path_factory) -> dict:
    (history,) = pools(1).run(_evaluate, eval_cfg(), str(tmp_path_factory.mktemp("ref")))
    (record,) = history
    got = buckets(record)
    tokens = [n for _, n in got.values()]
    assert sum(tokens) == record["eval_tokens"] == 2 * 4 * 256 and all(n > 0 for n in tokens)
    mean = sum(loss * n for loss, n in got.values()) / sum(tokens)
    assert mean == pytest.approx(record["eval_loss"], rel=1e-9)
    return record


@pytest.mark.parametrize("layout", [(1, 2, 1, "zigzag"), (2, 2, 1, "zigzag"), (1, 4, 1, "balanced"),
                                    (1, 2, 2, "zigzag")], ids=lambda t: "dp{}cp{}tp{}-{}".format(*t))
def test_position_loss_is_the_same_at_every_layout(pools, reference, tmp_path, layout):
    dp, cp, tp, kind = layout
    (record, *_) = pools(dp * cp * tp).run(_evaluate, eval_cfg(dp, cp, tp, f"parallel.layout={kind}"),
                                           str(tmp_path))[0]
    want, got = buckets(reference), buckets(record)
    assert [n for _, n in got.values()] == [n for _, n in want.values()]
    np.testing.assert_allclose([v for v, _ in got.values()], [v for v, _ in want.values()], rtol=1e-6)


def test_bad_position_loss_settings_are_config_errors(tmp_path):
    cfg = make_cfg(extra=("eval.tasks=[position_loss, passkey_typo]", "eval_tasks.position_loss.buckets=[1, 4, 2]",
                          "data.valid_fraction=0.05"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    msg = str(err.value)
    for line in ("eval.tasks names ['passkey_typo']: the tasks are ['position_loss', 'passkey', 'needle']",
                 "eval.tasks=['position_loss', 'passkey_typo'] run at each evaluation: set eval.every > 0",
                 "eval_tasks.position_loss.buckets=[1, 4, 2] must be increasing integers from 0"):
        assert line in msg, msg
    assert position_edges(10) == [0, 1, 2, 4, 8, 10] and position_edges(64, [0, 16]) == [0, 16, 64]


def transformers_position_loss(hf, cfg, edges: list[int]) -> dict[str, tuple[float, int]]:
    """transformers' loss per position bucket on the run's first eval batch, each packed document on its own."""
    from tests.helpers.hf_models import transformers_token_losses

    sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1, dtype=np.int64)
    for losses, pos in transformers_token_losses(hf, cfg):
        bucket = np.searchsorted(edges, pos.numpy(), side="right") - 1
        np.add.at(sums, bucket, losses.numpy())
        np.add.at(counts, bucket, 1)
    return {f"{a}-{b}": (sums[i] / counts[i], int(counts[i])) for i, (a, b) in enumerate(zip(edges, edges[1:]))}


def test_position_loss_of_a_pretrained_llama_at_1_2_2_equals_transformers(pools, tmp_path):
    from tests.dist.test_pretrained import pretrained_cfg
    from tests.helpers.hf_models import llama_dir

    hf = llama_dir(tmp_path / "llama", vocab=101)
    cfg = pretrained_cfg(hf, cp=2, tp=2, extra=("data.valid_fraction=0.2", "eval.every=1", "eval.batches=1",
                                                "trainer.max_steps=0", "eval.tasks=[position_loss]"))
    (record,) = pools(4).run(_evaluate, cfg, str(tmp_path / "run"))[0]
    edges = position_edges(cfg.trainer.seq_len)
    want = transformers_position_loss(hf, cfg, edges)
    for a, b in zip(edges, edges[1:]):
        loss, n = want[f"{a}-{b}"]
        assert record[f"eval/position_tokens/{a}-{b}"] == n
        assert record[f"eval/position_loss/{a}-{b}"] == pytest.approx(loss, rel=1e-5), f"{a}-{b}"
