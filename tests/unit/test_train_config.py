"""Single-process tests of the trainer's config schema, validation, schedule and helpers."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megaring.checkpoint.steps import TrainerState, prune, read_latest, rng_state, set_rng_state, tag_for
from megaring.cli.train import strip_launcher_args
from megaring.data import write_tokenized
from megaring.engine.deepspeed_engine import deepspeed_config
from megaring.train.config import (
    FREE_FORM_KEYS,
    OptimConfig,
    TrainConfig,
    command_line_problems,
    experiment_id,
    run_name,
)
from megaring.train.config_checks import ConfigError, collect_problems, resume_problems, validate
from megaring.train.metrics import MetricsFile, read_metrics
from megaring.train.schedule import learning_rate, lr_factor
from tests.helpers.cli import ROOT, clean_env
from tests.helpers.train_cfg import compose_cfg, make_cfg

# ---------------------------------------------------------------- schema


def test_contract_keys_compose_into_typed_config():
    cfg = compose_cfg("model=tiny", "data=mock", "parallel.dp=2", "parallel.cp=4", "parallel.tp=2",
                      "parallel.zero_stage=3", "parallel.sequence_parallel=true", "trainer.seq_len=256",
                      "trainer.global_batch_size=16", "trainer.micro_batch_size=2", "trainer.max_steps=7",
                      "trainer.seed=5", "optim.lr=0.001", "logging.wandb.mode=disabled")
    assert isinstance(cfg, TrainConfig)
    p, t = cfg.parallel, cfg.trainer
    assert (p.dp, p.cp, p.tp, p.zero_stage, p.sequence_parallel) == (2, 4, 2, 3, True)
    assert (t.seq_len, t.global_batch_size, t.micro_batch_size, t.max_steps, t.seed) == (256, 16, 2, 7, 5)
    assert cfg.optim.lr == 0.001 and cfg.logging.wandb.mode == "disabled"
    assert cfg.model.name == "tiny" and cfg.data.kind == "mock"
    assert cfg.data.vocab_size == cfg.model.vocab_size  # the mock vocabulary follows the model


def test_defaults_are_offline_wandb_and_valid_on_one_process():
    cfg = compose_cfg()
    assert cfg.logging.wandb.mode == "offline"
    assert collect_problems(cfg, world_size=1) == []


def test_files_data_and_other_models_compose(tmp_path):
    cfg = compose_cfg("data=files", f"data.path={tmp_path}", "model=125m")
    assert cfg.data.kind == "files" and cfg.data.path == str(tmp_path) and cfg.model.name == "125m"


def test_schema_rejects_unknown_keys_and_wrong_types():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.sequence_length"):
        compose_cfg("trainer.sequence_length=64")
    with pytest.raises(ConfigCompositionException, match="parallel.dp"):
        compose_cfg("parallel.dp=two")


def test_every_unknown_key_names_the_closest_one_with_or_without_plus():
    """Hydra adds a ``+`` key unchecked and, for one without ``+``, suggests the ``+``: both are errors."""
    with pytest.raises(ConfigError) as err:
        compose_cfg("+optim.learning_rate=100.0", "+trainer.foo=1", "+foo=1")
    msg = str(err.value)
    assert "(3 problems)" in msg and "optim.learning_rate is not a config key: did you mean optim.lr?" in msg
    assert "trainer.foo is not a config key: did you mean trainer." in msg and "\n  - foo is not a config key" in msg
    problems = command_line_problems([
        "optim.learning_rate=1", "+trainer.sequence_length=2", "seq_len=3", "optim.lr.x=1",
        "model=125m", "hydra/launcher=slurm", "hydra.run.dir=/tmp/x", "-m", "parallel.dp=1,2", "~trainer.seed",
        "+parallel.deepspeed.zero_optimization.reduce_bucket_size=5", "model.rope_scaling.factor=2"])
    assert [p.split(":")[0] + ":" + p.split("mean")[-1] for p in problems[:3]] == [
        "optim.learning_rate is not a config key: optim.lr? (docs/training.md, \"Config errors\")",
        "trainer.sequence_length is not a config key: trainer.seq_len? (docs/training.md, \"Config errors\")",
        "seq_len is not a config key: trainer.seq_len? (docs/training.md, \"Config errors\")"]
    assert problems[3] == "optim.lr.x: optim.lr is a value, not a section: set optim.lr=<value>"
    assert len(problems) == 4
    # values the field cannot hold, all in the same message (Hydra would stop at the first, exit 1)
    assert command_line_problems(["parallel.dp=two", "trainer.seq_len=1M", "parallel.dp=1,2", "optim.lr=1e-3",
                                  "data.vocab_size=${model.vocab_size}", "trainer.ckpt_dir=null"]) == [
        "parallel.dp='two': Value 'two' of type 'str' could not be converted to Integer",
        "trainer.seq_len='1M': Value '1M' of type 'str' could not be converted to Integer"]


def test_free_form_mappings_take_any_key_and_are_the_only_ones():
    cfg = compose_cfg("+data.sources.web={path: /data/web, weight: 0.7}", "+data.sources.code={path: /c, weight: 0.3}",
                      "+parallel.deepspeed.zero_optimization.reduce_bucket_size=5")
    assert cfg.parallel.deepspeed == {"zero_optimization": {"reduce_bucket_size": 5}}
    assert cfg.data.sources == {"web": {"path": "/data/web", "weight": 0.7}, "code": {"path": "/c", "weight": 0.3}}
    assert command_line_problems(["+data.sources.web={path: x, weight: 1}", "data.sourcez.web=1"]) == [
        "data.sourcez is not a config key: did you mean data.sources? (docs/training.md, \"Config errors\")"]
    # every mapping-typed field of the schema is declared free-form (the allow-list is the whole exception)
    def mappings(cls, prefix):
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                yield from mappings(type(value), f"{prefix}{f.name}.")
            elif "dict[" in str(f.type):
                yield f"{prefix}{f.name}"

    found = set(mappings(TrainConfig, ""))
    assert {"parallel.deepspeed", "model.rope_scaling", "data.sources"} <= found <= set(FREE_FORM_KEYS)


def test_rope_scaling_of_docs_pretrained_md_composes(tmp_path):
    """The exact override of docs/pretrained.md, with and without model.init_from (omegaconf could
    not merge a mapping into the schema's None)."""
    doc = (ROOT / "docs" / "pretrained.md").read_text()
    (override,) = set(re.findall(r"model\.rope_scaling=\{[^}]*\}", doc))
    yarn = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 4096}
    assert compose_cfg().model.rope_scaling is None  # plain RoPE by default
    cfg = compose_cfg(override, "trainer.seq_len=64")
    assert cfg.model.rope_scaling == yarn and collect_problems(cfg, world_size=1) == []
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}}))
    pretrained = compose_cfg(f"model.init_from={tmp_path}", override)
    assert pretrained.model.rope_scaling == yarn and pretrained.model.dim == 64  # the checkpoint's, yarn on top
    assert compose_cfg(f"model.init_from={tmp_path}").model.rope_scaling["rope_type"] == "llama3"
    one_key = compose_cfg(f"model.init_from={tmp_path}", "model.rope_scaling.factor=32").model.rope_scaling
    assert one_key == {"rope_type": "llama3", "factor": 32, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 1024}


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl is available with CUDA")
def test_backend_nccl_without_cuda_and_an_unknown_backend_are_config_errors():
    (nccl,) = collect_problems(compose_cfg("parallel.backend=nccl"), world_size=1)
    assert nccl.startswith("parallel.backend=nccl needs CUDA GPUs") and "set parallel.backend=gloo" in nccl
    (unknown,) = collect_problems(compose_cfg("parallel.backend=mpi"), world_size=1)
    assert "parallel.backend='mpi'" in unknown and "(nccl, gloo)" in unknown
    assert collect_problems(compose_cfg("parallel.backend=gloo"), world_size=1) == []


def test_too_small_valid_fraction_is_a_config_error_naming_the_minimum():
    small = ("data.num_tokens=20000", "data.mean_doc_len=200", "eval.every=1", "trainer.seq_len=64")
    (problem,) = collect_problems(compose_cfg(*small, "data.valid_fraction=0.001"), world_size=1)
    assert "fewer than one eval batch of 8 (trainer.global_batch_size)" in problem, problem
    minimum = re.search(r"the minimum is data\.valid_fraction=([0-9.]+) ", problem).group(1)
    assert collect_problems(compose_cfg(*small, f"data.valid_fraction={minimum}"), world_size=1) == []
    below = float(minimum) - 1 / 82  # one document fewer (the mock corpus has 82)
    assert "82 documents" in problem and collect_problems(compose_cfg(*small, f"data.valid_fraction={below}"), 1)


def test_unknown_key_on_the_command_line_exits_2_before_training(tmp_path):
    cmd = [sys.executable, "-m", "megaring.train", "+optim.learning_rate=100.0", "trainer.foo=1",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "did you mean optim.lr?" in proc.stderr and "trainer.foo is not a config key" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_run_name_is_stable_and_short():
    assert run_name("") == "default"
    assert run_name("model=tiny,parallel.dp=2") == "model=tiny,parallel.dp=2"
    long = ",".join(f"k{i}=v{i}" for i in range(100))
    assert len(run_name(long)) < 200 and run_name(long) == run_name(long) != run_name(long + "x")


def test_experiment_id_ignores_layout_but_not_the_model():
    a, b = make_cfg(dp=1), make_cfg(dp=2, cp=2, zero_stage=3)
    assert experiment_id(a) == experiment_id(b)
    assert experiment_id(a) != experiment_id(make_cfg(extra=("optim.lr=0.1",)))



# ---------------------------------------------------------------- validation


def test_every_problem_is_reported_at_once(tmp_path):
    store = tmp_path / "big_vocab"
    write_tokenized(store, [np.arange(50) % 999, np.arange(70) % 999], vocab_size=1000, eod_id=999)
    cfg = compose_cfg(
        "model=tiny", "data=files", f"data.path={store}",
        "parallel.dp=2", "parallel.cp=2", "parallel.tp=3", "parallel.sequence_parallel=true",
        "trainer.seq_len=34", "trainer.global_batch_size=6", "trainer.micro_batch_size=2",
        "optim.grad_clip=-1", "logging.wandb.mode=sometimes", "parallel.ring_backward=lean",
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=8)
    msg = str(err.value)
    expected = [
        "does not match the world size 8",  # 2*2*3 = 12 processes needed
        "sequence length 34 is not divisible by 2*cp=4",
        "model.n_heads=8 is not divisible by parallel.tp=3",
        "model.n_kv_heads=4 is not divisible by parallel.tp=3",
        "trainer.global_batch_size=6 must be divisible by trainer.micro_batch_size * parallel.dp = 2 * 2",
        "has a vocabulary of 1000 tokens, more than model.vocab_size=256",
        "optim.grad_clip=-1.0 must be >= 0",
        "logging.wandb.mode='sometimes'",
        "parallel.ring_backward='lean' must be one of ['chunked', 'whole']",
    ]
    for line in expected:
        assert line in msg, f"missing {line!r} in:\n{msg}"
    assert msg.count("\n  - ") == len(collect_problems(cfg, world_size=8)) >= len(expected)


def test_nproc_per_node_auto_spawns_the_whole_mesh():
    assert compose_cfg("parallel.dp=2", "parallel.cp=3", "parallel.nproc_per_node=auto").parallel.local_workers() == 6
    assert compose_cfg("parallel.nproc_per_node=5").parallel.local_workers() == 5
    bad = compose_cfg("parallel.nproc_per_node=many")
    with pytest.raises(ValueError, match="'many': give an integer >= 0 or 'auto'"):
        bad.parallel.local_workers()
    assert any("nproc_per_node='many'" in line for line in collect_problems(bad, world_size=1))


def test_sequence_parallel_needs_local_length_divisible_by_tp():
    cfg = compose_cfg("parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "trainer.seq_len=68")
    problems = collect_problems(cfg, world_size=8)
    assert any("sequence parallelism" in p and "divisible by parallel.tp=4" in p for p in problems), problems
    cfg.parallel.sequence_parallel = False
    assert collect_problems(cfg, world_size=8) == []


def test_missing_data_directory_is_a_problem(tmp_path):
    cfg = compose_cfg("data=files", f"data.path={tmp_path / 'nowhere'}")
    (problem,) = collect_problems(cfg, world_size=1)
    assert problem.startswith("data:") and "nowhere" in problem


def test_deepspeed_extras_may_not_override_owned_keys():
    cfg = compose_cfg("+parallel.deepspeed.gradient_clipping=1.0", "+parallel.deepspeed.train_batch_size=8")
    (problem,) = [p for p in collect_problems(cfg, 1) if "parallel.deepspeed" in p]
    assert "gradient_clipping" in problem and "train_batch_size" in problem


def test_resume_on_another_layout_is_refused(tmp_path):
    cfg = make_cfg(dp=2, zero_stage=2)
    (tmp_path / tag_for(4)).mkdir()
    state = TrainerState(4, 16, 1024, {"dp": 2, "cp": 1, "tp": 1, "zero_stage": 1})
    (tmp_path / tag_for(4) / "trainer_state.json").write_text(json.dumps(state.__dict__))
    (tmp_path / "latest").write_text(tag_for(4))
    (problem,) = resume_problems(cfg, tmp_path)
    assert "'zero_stage': 1" in problem and "'zero_stage': 2" in problem
    assert "universal/meta.json is missing" in problem and "trainer.universal_every left it out" in problem
    (tmp_path / tag_for(2) / "universal").mkdir(parents=True)  # an older checkpoint with the state
    (tmp_path / tag_for(2) / "universal" / "meta.json").write_text("{}")
    (problem,) = resume_problems(cfg, tmp_path)
    assert f"write step_00000002 into {tmp_path / 'latest'}" in problem
    cfg.trainer.resume = False  # starting over would discard that history
    (problem,) = resume_problems(cfg, tmp_path)
    assert "trainer.resume=false" in problem and "latest: step 4" in problem


@pytest.mark.parametrize("installed,allowed,refused", [
    ("0.19.8", False, False), ("0.21.0", False, True), ("0.18.5", False, True), ("0.21.0", True, False),
    (None, True, True)])
def test_deepspeed_outside_the_tested_range_is_refused(monkeypatch, installed, allowed, refused):
    import megaring.train.config_checks as validate_module

    monkeypatch.setattr(validate_module, "installed_version", lambda: installed)
    cfg = compose_cfg(f"parallel.allow_untested_deepspeed={str(allowed).lower()}")
    problems = [p for p in collect_problems(cfg, 1) if "DeepSpeed" in p]
    assert bool(problems) == refused, problems
    if refused and installed is not None:
        with pytest.raises(ConfigError) as err:
            validate(cfg, world_size=1)
        msg = str(err.value)
        assert f"DeepSpeed {installed} is installed" in msg and ">=0.19.8,<0.20" in msg
        assert "parallel.allow_untested_deepspeed=true" in msg
    elif refused:
        assert "DeepSpeed is not installed" in problems[0]


def test_universal_every_says_which_checkpoints_carry_the_layout_independent_state():
    every = compose_cfg().trainer
    assert every.universal_every is None and all(every.universal_at(s) for s in (1, 2, 7))
    some = compose_cfg("trainer.universal_every=4").trainer
    assert [s for s in range(1, 10) if some.universal_at(s)] == [4, 8]
    assert not any(compose_cfg("trainer.universal_every=0").trainer.universal_at(s) for s in (1, 4))
    negative = compose_cfg("trainer.universal_every=-1")
    assert any("trainer.universal_every=-1" in p for p in collect_problems(negative, 1))

# ---------------------------------------------------------------- engine config, schedule, launcher


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_deepspeed_config_takes_clip_and_batch_from_ours(clip):
    cfg = make_cfg(dp=2, cp=2, zero_stage=3, extra=(f"optim.grad_clip={clip}", "trainer.global_batch_size=8"))
    ds = deepspeed_config(cfg, torch.float32)
    assert ds["gradient_clipping"] == clip
    # DeepSpeed's batch accounting counts dp only: 8 = micro 1 * accumulation 4 * dp 2.
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (8, 1, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_scatter"] is True
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # from parallel.deepspeed
    assert ds["bf16"]["enabled"] is False


def test_schedules():
    kw = dict(warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(60, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(60, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(35, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_factor(35, schedule="cosine", **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, schedule="cosine", **kw) == lr_factor(500, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(500, schedule="constant", **kw) == 1.0
    cfg = OptimConfig(lr=2.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [learning_rate(s, cfg, max_steps=4) for s in range(4)] == [2.0, 1.5, 1.0, 0.5]


@pytest.mark.parametrize("argv,rest,local_rank", [
    (["prog", "--local_rank=3", "parallel.dp=2"], ["prog", "parallel.dp=2"], "3"),
    (["prog", "parallel.dp=2", "--local-rank", "1"], ["prog", "parallel.dp=2"], "1"),
    (["prog", "trainer.seed=3"], ["prog", "trainer.seed=3"], None),
])
def test_deepspeed_launcher_local_rank_is_accepted(monkeypatch, argv, rest, local_rank):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(argv) == rest
    assert os.environ.get("LOCAL_RANK") == local_rank

# ---------------------------------------------------------------- metrics and checkpoint helpers


def test_metrics_file_drops_steps_after_the_resumed_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsFile(path)
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricsFile(path, resume_step=2)
    resumed.write({"step": 3, "loss": 30.0})
    resumed.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsFile(path).close()  # a fresh run starts an empty file
    assert read_metrics(path) == []


def test_prune_keeps_the_newest_and_never_the_partial(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / tag_for(step)).mkdir()
    (tmp_path / (tag_for(10) + ".partial")).mkdir()
    (tmp_path / "latest").write_text(tag_for(8))
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(6), tag_for(8), tag_for(10) + ".partial"]
    assert read_latest(tmp_path) == tag_for(8)


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_dynamic_cp_problems_are_listed_together():
    cfg = compose_cfg("model=tiny", "data=mock", "parallel.cp=4", "parallel.ulysses=2", "parallel.dynamic_cp=true",
                      "parallel.dynamic_cp_tokens=16", "trainer.seq_len=128", "data.balance=even")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4)
    msg = str(err.value)
    for line in ("parallel.dynamic_cp_tokens=16: no cp group holds a sample of trainer.seq_len=128",
                 "raise it to >= 32 or 0", "parallel.dynamic_cp regroups ring ranks only",
                 "data.balance must be one of ('none', 'work'), got 'even'"):
        assert line in msg, f"missing {line!r} in:\n{msg}"
    ok = compose_cfg("model=tiny", "data=mock", "parallel.cp=4", "parallel.dynamic_cp=true",
                     "parallel.dynamic_cp_tokens=64", "trainer.seq_len=128", "trainer.global_batch_size=8")
    assert ok.attention_cp() == 2 and not collect_problems(ok, world_size=4)
