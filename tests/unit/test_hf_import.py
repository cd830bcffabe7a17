"""Hugging Face checkpoints in and out, single process (skipped without ``transformers``).

config.json mapping (both RoPE forms, each architecture, errors, override conflicts), every RoPE
variant against transformers' rotary embedding on zigzag shards, random Llama / Qwen2 / Mistral
checkpoints loaded at (1, 1) against transformers' own loss and logits (float32, 1e-5 relative),
sharded checkpoints, bad inputs (each error names the file), and export: bit-identical round
trips and exported directories that transformers loads with no missing keys and equal logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaring.distributed.mesh import Axis
from megaring.hf import (
    CheckpointError,
    build_model_from_hf,
    hf_config_dict,
    load_hf_weights,
    model_config_from_hf,
    override_problems,
    to_hf_state_dict,
    write_hf_checkpoint,
)
from megaring.hf.export import InMemory, parse_size
from megaring.hf.weights import INDEX_FILE
from megaring.layout import shard_sequence
from megaring.model import (
    IGNORE_INDEX,
    ModelConfig,
    ParallelContext,
    Transformer,
    build_model,
    count_valid_tokens,
    gather_full_state_dict,
    local_loss,
    validate_model_config,
    vocab_parallel_cross_entropy,
)
from megaring.model.init import ShardWriter
from megaring.model.rope import RopeSettings, rope_cos_sin
from tests.helpers.hf_models import hf_loss_and_logits, llama_dir, mistral_dir, qwen2_dir

transformers = pytest.importorskip("transformers")
RTOL = 1e-5
LLAMA_KEYS = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def hf_dict(arch="LlamaForCausalLM", **extra) -> dict:
    return {"architectures": [arch], **LLAMA_KEYS, **extra}


def megaring_loss_and_logits(model, tokens, **kwargs):
    ctx = ParallelContext.single()
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX  # transformers shifts the labels and drops the last position
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, positions, **kwargs)
    return local_loss(vocab_parallel_cross_entropy(logits, labels, ctx.tp), count_valid_tokens(labels)), logits


def assert_matches_hf(directory: Path, model, seq: int = 48):
    tokens = torch.randint(0, model.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, logits = megaring_loss_and_logits(model, tokens)
    hf_loss, hf_logits = hf_loss_and_logits(directory, tokens)
    assert rel_err(logits, hf_logits) <= RTOL, rel_err(logits, hf_logits)
    assert abs(loss.item() - hf_loss.item()) <= RTOL * hf_loss.item()


# --- config.json -> ModelConfig ----------------------------------------------------------------------

def test_both_rope_forms_give_the_same_config():
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    new = model_config_from_hf(hf_dict(rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", **llama3}))
    old = model_config_from_hf(hf_dict(rope_theta=500000.0, rope_scaling={"type": "llama3", **llama3}))
    assert new == old
    assert new.rope_theta == 500000.0 and new.rope_scaling == {"rope_type": "llama3", **llama3}
    plain = model_config_from_hf(hf_dict(rope_theta=10000.0, rope_scaling=None))
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0
    assert model_config_from_hf(hf_dict(rope_parameters={"rope_theta": 1e4, "rope_type": "default"})) == plain
    linear = model_config_from_hf(hf_dict(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_each_architecture_maps(tmp_path):
    llama = model_config_from_hf(llama_dir(tmp_path / "llama"))
    assert (llama.architecture, llama.n_kv_heads, llama.vocab_size, llama.ffn_dim, llama.tie_embeddings) == \
        ("llama", 2, 101, 64, False)
    assert llama.init_from == str(tmp_path / "llama") and llama.bos_token_id == 1 and llama.eos_token_id == 2
    tied = model_config_from_hf(hf_dict(tie_word_embeddings=True, eos_token_id=[7, 8]))  # Llama 3.2 / 3.1 style
    assert tied.tie_embeddings and tied.eos_token_id == [7, 8] and tied.init_from is None
    qwen = model_config_from_hf(hf_dict("Qwen2ForCausalLM", use_sliding_window=False, sliding_window=4096))
    assert (qwen.architecture, qwen.qkv_bias, qwen.attention_bias, qwen.sliding_window) == ("qwen2", True, False, None)
    mistral = model_config_from_hf(hf_dict("MistralForCausalLM", sliding_window=4096))
    assert (mistral.architecture, mistral.sliding_window) == ("mistral", 4096)
    assert model_config_from_hf(hf_dict("MistralForCausalLM", sliding_window=None)).sliding_window is None
    assert validate_model_config(mistral, seq_len=4096) == []
    assert validate_model_config(mistral, seq_len=8192) == []  # the ring computes the window


def test_unsupported_architecture_names_it_and_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_dict("GPT2LMHeadModel")))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        model_config_from_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_head_dim_rope_and_missing_keys_are_reported_together(tmp_path):
    raw = hf_dict(head_dim=16, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    raw.pop("intermediate_size")
    with pytest.raises(ValueError) as err:
        model_config_from_hf(raw)
    text = str(err.value)
    assert "'intermediate_size'" in text and "'longrope'" in text
    with pytest.raises(ValueError, match=r"head_dim=16 differs from hidden_size / num_attention_heads = 32/4"):
        model_config_from_hf(hf_dict(head_dim=16))
    assert model_config_from_hf(hf_dict(head_dim=8)).head_dim == 8
    with pytest.raises(ValueError, match="config.json"):
        model_config_from_hf(tmp_path)  # no config.json


def test_override_conflicts_name_key_value_and_checkpoint_value():
    cfg = dataclasses.replace(model_config_from_hf(hf_dict()), init_from="/ckpt/llama")
    problems = override_problems(cfg, {"model.n_layers": 3, "dim": 48, "rope_theta": 1e6, "ffn_dim": 64,
                                       "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                       "activation_checkpointing": True, "max_position_embeddings": 4096,
                                       "n_kv_heads": 2, "tie_embeddings": False, "bogus": 1})
    assert len(problems) == 3, problems
    assert any("model.n_layers=3" in p and "n_layers=2 there" in p and "/ckpt/llama" in p for p in problems)
    assert any("model.dim=48" in p and "dim=32 there" in p for p in problems)
    assert any("model.bogus" in p for p in problems)
    # Llama's rule gives 64 = 64 * ceil(int(0.75 * int(8 * 32 / 3)) / 64): the same shape
    assert override_problems(cfg, {"ffn_dim": None, "ffn_dim_multiplier": 0.75, "multiple_of": 64}) == []
    alone = override_problems(cfg, {"ffn_dim": None})  # 256 by the default rule
    assert len(alone) == 1 and "model.ffn_dim=None" in alone[0] and "ffn_dim=64 there" in alone[0]


def test_hf_config_dict_round_trips_and_transformers_accepts_it():
    for raw in (hf_dict(rope_parameters={"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 16}, bos_token_id=1, eos_token_id=2),
                hf_dict("Qwen2ForCausalLM", tie_word_embeddings=True),
                hf_dict("MistralForCausalLM", sliding_window=64)):
        cfg = model_config_from_hf(raw)
        out = hf_config_dict(cfg, dtype=torch.bfloat16)
        assert out["dtype"] == "bfloat16" and out["vocab_size"] == 101 and "rope_theta" in out["rope_parameters"]
        assert model_config_from_hf(out) == cfg
        hf_cfg = transformers.AutoConfig.for_model(**out)
        assert hf_cfg.rope_parameters["rope_type"] == out["rope_parameters"]["rope_type"]
    with pytest.raises(ValueError, match="q/k/v-only bias"):
        hf_config_dict(ModelConfig(qkv_bias=True))


# --- RoPE variants against transformers --------------------------------------------------------------

ROPE_VARIANTS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.8,
                    "mscale_all_dim": 0.6, "beta_fast": 16.0, "beta_slow": 2.0},
}


@pytest.mark.parametrize("max_pos", [64, 512], ids=["beyond_max", "within_max"])
@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_variant_matches_transformers_on_zigzag_shards(variant, max_pos):
    rope = ROPE_VARIANTS[variant]
    raw = hf_dict(hidden_size=128, num_attention_heads=4, max_position_embeddings=max_pos,
                  rope_parameters={"rope_theta": 500000.0, **rope})
    hf_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(transformers.LlamaConfig(**raw))
    # packed documents: positions restart; the longest runs to 299 (past max_pos=64)
    positions = torch.cat([torch.arange(20), torch.arange(300), torch.arange(40)])[None].repeat(2, 1)  # (2, 360)
    hf_cos, hf_sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions)  # (B, S, D)
    settings = RopeSettings.from_config(model_config_from_hf(raw))
    for cp in (1, 4):
        for rank in range(cp):
            local = shard_sequence(positions, dim=1, rank=rank, world_size=cp)
            cos, sin = rope_cos_sin(local, settings, torch.float32, seq_len=300)  # (B, S/cp, 1, D)
            for ours, theirs in ((cos, hf_cos), (sin, hf_sin)):
                want = shard_sequence(theirs, dim=1, rank=rank, world_size=cp)
                assert (ours[:, :, 0] - want).abs().max().item() <= 1e-6, (variant, cp, rank)
    if variant == "dynamic" and max_pos == 64:  # the length matters: a shard's own max would be wrong
        short, _ = rope_cos_sin(positions, settings, torch.float32, seq_len=200)
        assert (short[:, :, 0] - hf_cos).abs().max().item() > 1e-3


# --- loading checkpoints at (1, 1) against transformers ---------------------------------------------

@pytest.mark.parametrize("maker,kwargs", [
    (llama_dir, {}),  # GQA, untied, odd vocabulary, llama3 RoPE
    (llama_dir, {"tie": True, "vocab": 128}),  # Llama 3.2 style tied embeddings
    (llama_dir, {"rope": {"rope_type": "dynamic", "factor": 2.0}}),  # 96 positions > 64: NTK scaling active
    (llama_dir, {"rope": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    (qwen2_dir, {}),  # q/k/v biases, no o_proj bias, tied
    (mistral_dir, {}),  # one kv head
    (mistral_dir, {"sliding_window": 16}),  # a window shorter than the 48 tokens (docs/pretrained.md)
], ids=["llama", "llama_tied", "llama_dynamic", "llama_yarn", "qwen2", "mistral", "mistral_window"])
def test_loaded_model_matches_transformers(tmp_path, maker, kwargs):
    directory = maker(tmp_path / "hf", **kwargs)
    model, cfg = build_model_from_hf(directory, ParallelContext.single())
    if cfg.architecture == "qwen2":
        assert model.layers[0].attention.wqkv.bias is not None and model.layers[0].attention.wo.bias is None
    assert_matches_hf(directory, model, seq=96 if "rope" in kwargs else 48)


def test_sharded_checkpoint_loads(tmp_path):
    directory = llama_dir(tmp_path / "hf", max_shard_size="50KB")
    index = json.loads((directory / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = build_model_from_hf(directory, ParallelContext.single())
    assert_matches_hf(directory, model)


class _Partition(ShardWriter):
    """Keeps partition ``rank`` of ``n`` of each flattened shard, as ZeRO-3 splits it (last one short)."""

    def __init__(self, rank: int, n: int):
        self.rank, self.n, self.kept = rank, n, {}

    def owned_range(self, param):
        size = -(-param.numel() // self.n)
        return min(self.rank * size, param.numel()), min((self.rank + 1) * size, param.numel())

    def write(self, param, flat):
        self.kept[param] = flat.clone()


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_partitioned_reads_give_the_shards_elements(tmp_path, tp_rank):
    """A writer owning part of each shard gets exactly those elements of it, reading only the rows
    that hold them: 3 partitions of tp rank ``tp_rank``'s shards at tp=2 (fused q/k/v and
    gate/up rows, row-parallel columns, the padded vocabulary)."""
    directory = llama_dir(tmp_path / "hf", max_shard_size="50KB")
    ctx = ParallelContext(Axis("tp", None, tp_rank, 2, (0, 1)), Axis.single("cp"))
    whole = Transformer(model_config_from_hf(directory), ctx)
    full = load_hf_weights(whole, ctx, directory)
    parts = [_Partition(r, 3) for r in range(3)]
    reports = [load_hf_weights(whole, ctx, directory, writer) for writer in parts]
    for p in whole.parameters():
        assert torch.equal(torch.cat([w.kept[p] for w in parts]), p.detach().reshape(-1))
    assert max(r.largest_held for r in reports) <= 0.5 * full.largest_held
    assert full.bytes_read <= sum(r.bytes_read for r in reports) <= 1.2 * full.bytes_read


def test_overrides_apply_and_conflicts_raise(tmp_path):
    directory = llama_dir(tmp_path / "hf")
    model, cfg = build_model_from_hf(directory, ParallelContext.single(),
                                     {"model.activation_checkpointing": True, "rope_theta": 1e6})
    assert cfg.activation_checkpointing and model.rope.theta == 1e6
    with pytest.raises(ValueError, match=r"model.n_heads=8 conflicts"):
        build_model_from_hf(directory, ParallelContext.single(), {"model.n_heads": 8})


# --- bad checkpoints: one error naming the file -------------------------------------------------------

def _load_into_fresh_model(directory):
    ctx = ParallelContext.single()
    model = build_model(model_config_from_hf(directory), ctx)
    return load_hf_weights(model, ctx, directory)


def test_bad_checkpoints_raise_naming_the_file(tmp_path):
    single = llama_dir(tmp_path / "single")
    weights = single / "model.safetensors"
    tensors = load_file(weights)
    norm = tensors.pop("model.norm.weight")
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(31)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        _load_into_fresh_model(single)
    text = str(err.value)
    assert "missing tensor 'model.norm.weight'" in text and "has shape (31,), expected (32,)" in text
    assert str(weights) in text and text.count("\n  - ") == 2
    tensors["model.norm.weight"] = norm
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(32)
    save_file(tensors, weights, metadata={"format": "pt"})
    _load_into_fresh_model(single)  # repaired

    sharded = llama_dir(tmp_path / "sharded", max_shard_size="50KB")
    files = sorted(sharded.glob("model-*.safetensors"))
    files[0].unlink()
    with open(files[1], "r+b") as f:  # overwrite the header length: "header too large"
        f.write(b"\xff" * 8)
    size = os.path.getsize(files[2])
    with open(files[2], "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError) as err:
        _load_into_fresh_model(sharded)
    text = str(err.value)
    assert f"{files[0]}: missing weight file" in text
    assert f"{files[1]}: cannot read the safetensors file" in text
    assert f"{files[2]}: cannot read the safetensors file" in text

    (single / "config.json").write_text(json.dumps(hf_dict("FalconForCausalLM")))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        build_model_from_hf(single, ParallelContext.single())
    (single / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json"):
        build_model_from_hf(single, ParallelContext.single())


def test_config_that_disagrees_with_the_model_is_reported(tmp_path):
    directory = llama_dir(tmp_path / "hf")
    ctx = ParallelContext.single()
    model = build_model(dataclasses.replace(model_config_from_hf(directory), n_layers=1), ctx)
    with pytest.raises(CheckpointError, match=r"config\.json: n_layers=2, the model has 1"):
        load_hf_weights(model, ctx, directory)


# --- export ----------------------------------------------------------------------------------------------

def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("maker,kwargs", [(llama_dir, {"max_shard_size": "50KB"}), (qwen2_dir, {})],
                         ids=["llama_sharded", "qwen2_biases_tied"])
def test_import_export_round_trip_is_bit_identical(tmp_path, maker, kwargs):
    directory = maker(tmp_path / "hf", **kwargs)
    model, cfg = build_model_from_hf(directory, ParallelContext.single())
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    out = write_hf_checkpoint(gather_full_state_dict(model, ParallelContext.single()), cfg, tmp_path / "out",
                              max_shard_size="20KB", tokenizer_files=[tokenizer])
    want, got = _all_tensors(directory), _all_tensors(out)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    index = json.loads((out / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and files == {f.name for f in out.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "generation_config.json").read_text()).get("eos_token_id") == cfg.eos_token_id
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=250, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, rope_theta=5e5,
                rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ModelConfig(vocab_size=130, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True,
                qkv_bias=True, architecture="qwen2"),
], ids=["llama_linear", "qwen2"])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, cfg):
    ctx = ParallelContext.single()
    model = build_model(cfg, ctx, seed=3)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in gather_full_state_dict(model, ctx).items()}
    out = write_hf_checkpoint(state, cfg, tmp_path / "out")
    write_hf_checkpoint(state, cfg, out, overwrite=True)  # over the earlier export
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded, _ = build_model_from_hf(out, ctx)
    assert all(torch.equal(gather_full_state_dict(reloaded, ctx)[k], v) for k, v in state.items())
    assert_matches_hf(out, reloaded)


def test_export_casts_and_parses_shard_sizes(tmp_path):
    cfg = ModelConfig(vocab_size=100, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64)
    ctx = ParallelContext.single()
    out = write_hf_checkpoint(gather_full_state_dict(build_model(cfg, ctx), ctx), cfg, tmp_path / "bf16",
                              dtype=torch.bfloat16, max_shard_size=10_000)
    assert {t.dtype for t in _all_tensors(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (parse_size("5GB"), parse_size("500MB"), parse_size("2GiB"), parse_size(7)) == (5e9, 5e8, 2**31, 7)
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


class _Watched(InMemory):
    """Counts, at each read, the rows it handed out earlier that are still alive."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.handed, self.alive_at_read, self.read_bytes = [], [], []

    def read(self, name, start, stop):
        self.alive_at_read.append(sum(ref() is not None for ref in self.handed))
        rows = self.tensors[name][start:stop].clone()
        self.read_bytes.append(rows.nbytes)
        self.handed.append(weakref.ref(rows))
        return rows


def test_export_streams_a_chunk_of_rows_at_a_time(tmp_path):
    """Rows of one tensor at a time, each chunk freed before the next is read (peak: one chunk), in
    one file or several; the files hold what safetensors' own writer would store."""
    cfg = ModelConfig(vocab_size=100, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64)
    ctx = ParallelContext.single()
    state = gather_full_state_dict(build_model(cfg, ctx, seed=1), ctx)
    for shard_size, dtype in (("5GB", None), ("20KB", torch.bfloat16)):
        source = _Watched(state)
        out = write_hf_checkpoint(source, cfg, tmp_path / f"out{shard_size}", dtype=dtype, max_shard_size=shard_size,
                                  chunk_bytes=1000)
        assert max(source.alive_at_read) == 0 and max(source.read_bytes) <= 1000
        assert sum(source.read_bytes) == sum(t.nbytes for t in state.values())  # every row read once
        want = {k: v.to(dtype or v.dtype).contiguous() for k, v in to_hf_state_dict(state, cfg).items()}
        got = _all_tensors(out)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
