"""Pretrained models in and out: ``model.init_from``, evaluation against transformers, export, and
resuming a checkpoint on another layout. Real trainer runs on gloo worker pools; tiny shapes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.hf_models import llama_dir, transformers_token_losses
from tests.helpers.train_cfg import compose_cfg, make_cfg

pytestmark = pytest.mark.slow

VOCAB = 101  # odd: tp=2 pads the vocabulary
DATA = ("data=mock", f"data.vocab_size={VOCAB}", "data.num_tokens=20000", "data.mean_doc_len=150")


def _train(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return llama_dir(tmp_path_factory.mktemp("hf") / "llama", vocab=VOCAB)


def pretrained_cfg(hf: Path, *, dp=1, cp=1, tp=1, zero_stage=1, extra=()):
    return make_cfg(dp=dp, cp=cp, tp=tp, zero_stage=zero_stage, micro_batch_size=4 // dp,
                    extra=(*DATA, f"model.init_from={hf}", *extra))


def transformers_eval_loss(hf: Path, cfg) -> float:
    """transformers' mean next-token loss on the run's first eval batch, each packed document on its own."""
    losses = torch.cat([loss for loss, _ in transformers_token_losses(hf, cfg)])
    return losses.sum().item() / losses.numel()


def test_eval_of_a_pretrained_checkpoint_at_1_2_2_equals_transformers(pools, hf_dir, tmp_path):
    cfg = pretrained_cfg(hf_dir, cp=2, tp=2, extra=("data.valid_fraction=0.2", "eval.every=1", "eval.batches=1",
                                                    "trainer.max_steps=0"))
    assert cfg.model.vocab_size == VOCAB and cfg.model.rope_scaling["rope_type"] == "llama3"
    per_rank = pools(4).run(_train, cfg, str(tmp_path))
    (record,) = per_rank[0]
    assert record["eval_loss"] == pytest.approx(transformers_eval_loss(hf_dir, cfg), rel=1e-5)


def _zero3_load(rank: int, world_size: int, cfg, hf: str) -> dict:
    from megaring.distributed import build_mesh
    from megaring.hf import load_hf_weights
    from megaring.model import ParallelContext
    from megaring.engine.deepspeed_engine import ZeroPartitionWriter, build_engine
    from megaring.train.trainer import build_weights

    mesh, device = build_mesh(cfg.parallel.dims()), torch.device("cpu")
    ctx = ParallelContext.from_mesh(mesh)
    model = build_weights(cfg, ctx, mesh, device)
    held = sum(p.numel() for p in model.parameters())  # ZeRO-3 freed every parameter's data
    stored = sum(p.ds_tensor.numel() for p in model.parameters())
    report = load_hf_weights(model, ctx, hf, ZeroPartitionWriter())  # again, for what it reads: same values
    engine = build_engine(model, cfg, mesh, device)
    weights = {name: engine.master_state(p, "param") for name, p in engine.module.named_parameters()}
    return dict(held=held, stored=stored, weights=weights, bytes_read=report.bytes_read,
                largest_held=report.largest_held)


def test_zero3_partitions_the_parameters_as_it_loads_them(pools, hf_dir):
    """ZeRO-3 at dp=2 (small parameters persisted, as by default): each rank reads about half of
    the checkpoint, stores half of the model, never holds more than about half of one tensor, and
    the weights the engine trains are exactly the checkpoint's."""
    from megaring.hf import hf_model_config, load_hf_weights
    from megaring.model import ParallelContext, Transformer

    cfg = compose_cfg(*DATA, f"model.init_from={hf_dir}", "parallel.dp=2", "parallel.zero_stage=3",
                      "trainer.seq_len=64", "trainer.global_batch_size=2", "logging.wandb.mode=disabled")
    ref = Transformer(hf_model_config(hf_dir), ParallelContext.single())
    whole = load_hf_weights(ref, ParallelContext.single(), hf_dir)
    total = sum(p.numel() for p in ref.parameters())
    results = pools(2).run(_zero3_load, cfg, str(hf_dir))
    for rank, r in enumerate(results):
        assert r["held"] == 0, f"rank {rank} holds whole parameters"
        assert r["stored"] <= total / 2 + len(r["weights"]), f"rank {rank} stores {r['stored']} of {total}"
        assert r["bytes_read"] <= 0.6 * whole.bytes_read, f"rank {rank} read {r['bytes_read']} of {whole.bytes_read}"
        assert r["largest_held"] <= 0.6 * whole.largest_held, f"rank {rank} held {r['largest_held']} bytes at once"
        for name, p in ref.named_parameters():
            assert torch.equal(r["weights"][name], p.detach()), f"rank {rank}: {name}"
    assert sum(r["bytes_read"] for r in results) >= whole.bytes_read


def _bf16_masters(rank: int, world_size: int, cfg) -> list[str]:
    from megaring.distributed import build_mesh
    from megaring.model import ParallelContext, build_model
    from megaring.engine.deepspeed_engine import build_engine

    mesh = build_mesh(cfg.parallel.dims())
    engine = build_engine(build_model(cfg.model, ParallelContext.from_mesh(mesh), seed=0), cfg, mesh,
                          torch.device("cpu"))
    engine.prime_optimizer_states(3)
    wrong = []
    for i, (name, p) in enumerate(engine.module.named_parameters()):
        master = engine.master_state(p, "param")
        engine.set_master_state(p, "exp_avg", torch.full(p.shape, float(i)))  # Adam's state, keyed by the fp32 copy
        if not (p.dtype == torch.bfloat16 and master.dtype == torch.float32 and torch.equal(master.bfloat16(), p)
                and torch.equal(engine.master_state(p, "exp_avg"), torch.full(p.shape, float(i)))):
            wrong.append(name)
    return wrong


def test_bf16_without_zero_reads_and_sets_each_weights_fp32_copy(pools):
    cfg = make_cfg(zero_stage=0, micro_batch_size=4, extra=("trainer.dtype=bfloat16",))
    assert pools(1).run(_bf16_masters, cfg) == [[]]


EXPORT_LAYOUTS = [(1, 1, 1, 0), (1, 1, 2, 1), (2, 1, 1, 2), (2, 1, 2, 3)]  # ZeRO 0-3, tp 1-2


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS, ids=lambda t: "dp{}cp{}tp{}z{}".format(*t))
def test_export_after_zero_updates_is_bit_identical_to_the_input(pools, hf_dir, tmp_path, layout):
    from megaring.cli.export import ExportConfig, export

    dp, cp, tp, zero = layout
    cfg = pretrained_cfg(hf_dir, dp=dp, cp=cp, tp=tp, zero_stage=zero, extra=("optim.lr=0", "trainer.max_steps=1"))
    pools(dp * cp * tp).run(_train, cfg, str(tmp_path / "run"))
    assert_each_rank_wrote_its_share(tmp_path / "run" / "checkpoints" / "step_00000001", dp * cp * tp)
    out = export(ExportConfig(input=str(tmp_path / "run"), output=str(tmp_path / "hf_out")))
    want, got = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB


def assert_each_rank_wrote_its_share(step_dir: Path, world: int) -> None:
    """Every rank wrote its own pieces of the layout-independent state: together each element of
    every tp shard once, each rank about 1 / world of it (no gather to rank 0)."""
    meta = json.loads((step_dir / "universal" / "meta.json").read_text())
    assert meta["world_size"] == world
    per_shard = {n: math.prod(t["shard_shape"]) * (1 if t["partition"] is None else t["tp_size"])
                 for n, t in meta["tensors"].items()}
    total = 3 * sum(per_shard.values())  # param, exp_avg, exp_avg_sq
    written = []
    for rank in range(world):
        pieces = json.loads((step_dir / "universal" / f"rank_{rank:05d}.json").read_text())["pieces"]
        written.append(sum(p["stop"] - p["start"] for p in pieces))
        files = {p["file"] for p in pieces}
        assert all(f.startswith(f"rank_{rank:05d}-") for f in files)
        on_disk = sum((step_dir / "universal" / f).stat().st_size for f in files)
        assert on_disk < 4 * written[-1] + 256 * len(pieces)  # its pieces and their headers, nothing more
    assert sum(written) == total, (written, total)
    assert max(written) < 1.5 * total / world, written


def test_export_after_training_gives_megarings_logits_in_transformers(pools, hf_dir, tmp_path):
    import transformers

    from megaring.model import ParallelContext, Transformer
    from megaring.cli.export import ExportConfig, export
    from megaring.checkpoint.universal import UniversalState, load_weights

    cfg = pretrained_cfg(hf_dir, dp=2, tp=2, zero_stage=3, extra=("trainer.max_steps=2",))
    pools(4).run(_train, cfg, str(tmp_path / "run"))
    out = export(ExportConfig(input=str(tmp_path / "run" / "checkpoints"), output=str(tmp_path / "hf_out"),
                              max_shard_size="20KB"))
    assert (out / "model.safetensors.index.json").is_file()  # sharded as asked
    trained = {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    original = load_file(hf_dir / "model.safetensors")
    assert sorted(trained) == sorted(original) and any(not torch.equal(trained[k], original[k]) for k in original)
    (step_dir,) = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name == "step_00000002"]
    state = UniversalState(step_dir)
    ours = Transformer(state.model_config, ParallelContext.single())
    load_weights(ours, state, ParallelContext.single().tp)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = ours(tokens, torch.arange(32).expand(2, 32))[..., :VOCAB]
        got = hf(input_ids=tokens).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


RESUMES = [((1, 2, 2, 2), (2, 1, 1, 3)), ((2, 2, 1, 1), (1, 1, 2, 2))]


@pytest.mark.parametrize("before,after", RESUMES, ids=lambda t: "dp{}cp{}tp{}z{}".format(*t))
def test_resume_on_another_layout_continues_the_run(pools, tmp_path, before, after):
    def cfg_at(layout, run_dir: Path):
        dp, cp, tp, zero = layout
        cfg = make_cfg(dp=dp, cp=cp, tp=tp, zero_stage=zero, micro_batch_size=4 // dp,
                       extra=("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_last=2",
                              f"trainer.ckpt_dir={run_dir / 'checkpoints'}"))
        return cfg, dp * cp * tp

    cfg, world = cfg_at(before, tmp_path / "a")
    uninterrupted = [m for m in pools(world).run(_train, cfg, str(tmp_path / "a"))[0] if "loss" in m]
    moved = tmp_path / "b" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000002", moved / "step_00000002")
    (moved / "latest").write_text("step_00000002")
    cfg, world = cfg_at(after, tmp_path / "b")
    continued = pools(world).run(_train, cfg, str(tmp_path / "b"))[0]
    assert [m["step"] for m in continued] == [3, 4]
    for got, want in zip(continued, uninterrupted[2:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["lr"] == want["lr"]


def test_checkpoints_without_universal_state_resume_on_their_layout_only(pools, tmp_path):
    from megaring.cli.export import ExportConfig, export
    from megaring.checkpoint.universal import UniversalError
    from megaring.train.config_checks import collect_problems

    extra = ("trainer.checkpoint_every=1", "trainer.universal_every=2", "trainer.keep_last=3")
    first = make_cfg(micro_batch_size=4, extra=("trainer.max_steps=3", *extra))
    uninterrupted = [m["loss"] for m in pools(1).run(_train, first, str(tmp_path / "a"))[0] if "loss" in m]
    ckpt = tmp_path / "a" / "checkpoints"
    assert [(ckpt / t / "universal").exists() for t in ("step_00000001", "step_00000002", "step_00000003")] == [
        False, True, False]
    shutil.copytree(ckpt / "step_00000001", tmp_path / "b" / "checkpoints" / "step_00000001")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_00000001")
    again = make_cfg(micro_batch_size=4, extra=("trainer.max_steps=3", *extra))
    resumed = [m for m in pools(1).run(_train, again, str(tmp_path / "b"))[0] if "loss" in m]
    assert [m["step"] for m in resumed] == [2, 3]  # the same layout needs only DeepSpeed's files
    assert [m["loss"] for m in resumed] == uninterrupted[1:]
    moved = make_cfg(dp=2, zero_stage=2, micro_batch_size=2, extra=("trainer.max_steps=4", *extra))
    (problem,) = collect_problems(moved, 2, ckpt)  # latest: step 3, without the state
    assert "cannot be converted" in problem and "trainer.universal_every left it out" in problem
    assert f"write step_00000002 into {ckpt / 'latest'}" in problem
    with pytest.raises(UniversalError, match="universal/meta.json is missing"):
        export(ExportConfig(input=str(ckpt), output=str(tmp_path / "hf")))


def test_bad_pretrained_input_is_one_clear_error(hf_dir, tmp_path):
    from megaring.errors import ConfigError
    from megaring.cli.export import ExportConfig, ExportError, export
    from megaring.checkpoint.universal import UniversalError
    from megaring.train.config_checks import collect_problems

    with pytest.raises(ConfigError, match=r"model.dim=48.*conflicts with the checkpoint"):
        compose_cfg(*DATA, f"model.init_from={hf_dir}", "model.dim=48")
    odd = tmp_path / "odd"
    shutil.copytree(hf_dir, odd)
    config = json.loads((odd / "config.json").read_text()) | {"architectures": ["GPT2LMHeadModel"]}
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"(?s)config.json.*GPT2LMHeadModel'\] is not supported"):
        compose_cfg(*DATA, f"model.init_from={odd}")
    too_big = pretrained_cfg(hf_dir, extra=("data.vocab_size=300",))
    assert any("vocab" in p and "300" in p for p in collect_problems(too_big, 1))

    partial = tmp_path / "ckpt" / "step_00000003.partial"
    partial.mkdir(parents=True)
    with pytest.raises(ExportError, match="step_00000003.partial is a save that did not complete"):
        export(ExportConfig(input=str(partial), output=str(tmp_path / "out")))
    with pytest.raises(ExportError, match="is inside input"):
        export(ExportConfig(input=str(tmp_path / "ckpt"), output=str(tmp_path / "ckpt" / "hf")))
    old = tmp_path / "old" / "step_00000001"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text("{}")
    with pytest.raises(UniversalError, match="universal/meta.json is missing"):
        export(ExportConfig(input=str(old), output=str(tmp_path / "out")))
