"""parallel.ulysses in the training config: every problem in one error, before any collective."""

from __future__ import annotations

import pytest

from megaring.errors import ConfigError
from megaring.model import ModelConfig, validate_model_config
from megaring.train.config_checks import validate
from tests.helpers.train_cfg import make_cfg


def test_every_divisibility_problem_in_one_error():
    cfg = make_cfg(cp=4, tp=2, extra=("parallel.ulysses=3",))  # tiny: 8 heads, 4 kv heads
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=8)  # pure arithmetic: no process group exists here
    msg = str(err.value)
    for fragment in ("parallel.ulysses=3 must divide parallel.cp=4",
                     "model.n_heads/tp=8/2 (4) are not divisible by parallel.ulysses=3",
                     "model.n_kv_heads/tp=4/2 (2) must be a multiple or a divisor of parallel.ulysses=3"):
        assert fragment in msg, msg


@pytest.mark.parametrize("n_heads,n_kv,tp,ulysses,bad", [
    (8, 4, 1, 2, []), (8, 2, 2, 2, []), (8, 1, 1, 4, []), (8, 8, 2, 4, []),
    (8, 4, 1, 16, ["query heads"]), (12, 4, 1, 6, ["kv heads"]), (12, 6, 1, 8, ["query heads", "kv heads"]),
])
def test_head_rules(n_heads, n_kv, tp, ulysses, bad):
    cfg = ModelConfig(n_heads=n_heads, n_kv_heads=n_kv, dim=8 * n_heads)
    problems = validate_model_config(cfg, tp=tp, ulysses=ulysses)
    assert len(problems) == len(bad), problems
    for fragment, problem in zip(bad, problems):
        assert ("model.n_heads" if fragment == "query heads" else "model.n_kv_heads") in problem
