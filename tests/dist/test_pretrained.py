"""Pretrained models in and out: ``model.init_from``, evaluation against transformers, export, and
resuming a checkpoint on another layout. Real trainer runs on gloo worker pools; tiny shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.hf_models import llama_dir
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
    import transformers

    from megaring.data import RankShard, build_eval_reader

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    reader = build_eval_reader(cfg.data, cfg.trainer.batch_shape(), RankShard())
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in reader.micro_batches(0):
            for row in range(mb["tokens"].shape[0]):
                seg = mb["segment_ids"][row]
                for s in seg.unique():
                    keep = seg == s
                    logits = model(input_ids=mb["tokens"][row][keep][None],
                                   position_ids=mb["positions"][row][keep][None]).logits[0]
                    total += torch.nn.functional.cross_entropy(logits.double(), mb["labels"][row][keep],
                                                               reduction="sum").item()
                    count += int(keep.sum())
    return total / count


def test_eval_of_a_pretrained_checkpoint_at_1_2_2_equals_transformers(pools, hf_dir, tmp_path):
    cfg = pretrained_cfg(hf_dir, cp=2, tp=2, extra=("data.valid_fraction=0.2", "eval.every=1", "eval.batches=1",
                                                    "trainer.max_steps=0"))
    assert cfg.model.vocab_size == VOCAB and cfg.model.rope_scaling["rope_type"] == "llama3"
    per_rank = pools(4).run(_train, cfg, str(tmp_path))
    (record,) = per_rank[0]
    assert record["eval_loss"] == pytest.approx(transformers_eval_loss(hf_dir, cfg), rel=1e-5)


EXPORT_LAYOUTS = [(1, 1, 1, 0), (1, 1, 2, 1), (2, 1, 1, 2), (2, 1, 2, 3)]  # ZeRO 0-3, tp 1-2


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS, ids=lambda t: "dp{}cp{}tp{}z{}".format(*t))
def test_export_after_zero_updates_is_bit_identical_to_the_input(pools, hf_dir, tmp_path, layout):
    from megaring.train.export import ExportConfig, export

    dp, cp, tp, zero = layout
    cfg = pretrained_cfg(hf_dir, dp=dp, cp=cp, tp=tp, zero_stage=zero, extra=("optim.lr=0", "trainer.max_steps=1"))
    pools(dp * cp * tp).run(_train, cfg, str(tmp_path / "run"))
    out = export(ExportConfig(input=str(tmp_path / "run"), output=str(tmp_path / "hf_out")))
    want, got = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB


def test_export_after_training_gives_megarings_logits_in_transformers(pools, hf_dir, tmp_path):
    import transformers

    from megaring.model import ParallelContext, Transformer
    from megaring.train.export import ExportConfig, export
    from megaring.train.universal import UniversalState, load_weights

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


def test_bad_pretrained_input_is_one_clear_error(hf_dir, tmp_path):
    from megaring.errors import ConfigError
    from megaring.train.export import ExportConfig, ExportError, export
    from megaring.train.universal import UniversalError
    from megaring.train.validate import collect_problems

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
