"""``model.init_from`` on bad input, single process: every problem is one line that names the file and
what to change, found by the trainer's checks before any collective (``ConfigError``: exit status 2),
from the safetensors headers; NaN or inf found as the weights are read is a ``CheckpointError`` (also
exit status 2), and a worker's reason is printed once, without a traceback."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaring.errors import BadInput, ConfigError
from megaring.hf import CheckpointError, load_hf_weights, model_config_from_hf
from megaring.model import ParallelContext, build_model
from megaring.ops import spawn
from megaring.train.config_checks import validate
from tests.helpers.hf_models import llama_dir, qwen2_dir
from tests.helpers.train_cfg import compose_cfg

pytest.importorskip("transformers")
RUN = ("data=mock", "data.vocab_size=101", "data.num_tokens=4000", "trainer.seq_len=32",
       "trainer.global_batch_size=2", "logging.wandb.mode=disabled")


def _edit(directory: Path, edit) -> Path:
    """``directory``'s single ``model.safetensors`` rewritten with ``edit(tensors)`` applied."""
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return directory


def _validate(directory: Path, *extra: str) -> None:
    """The trainer's checks, as every rank (and the local spawner's parent) runs them before any collective."""
    validate(compose_cfg(*RUN, f"model.init_from={directory}", *extra), 1)


def _load(directory: Path, **overrides):
    ctx = ParallelContext.single()
    cfg = model_config_from_hf(directory)
    model = build_model(dataclasses.replace(cfg, **overrides), ctx)
    load_hf_weights(model, ctx, directory)
    return model


def test_tensors_the_config_does_not_account_for_are_an_error_unless_allowed(tmp_path):
    extra = {"model.layers.2.input_layernorm.weight": torch.ones(32), "model.layers.2.mlp.up_proj.weight":
             torch.ones(64, 32), "model.layers.3.mlp.up_proj.weight": torch.ones(64, 32)}
    directory = _edit(llama_dir(tmp_path / "hf"), lambda t: t.update(extra))
    want = (r"3 tensors that the config \(2 layers, tied embeddings: False\) has no parameter for: "
            r"'model.layers.2.input_layernorm.weight', 'model.layers.2.mlp.up_proj.weight', "
            r"'model.layers.3.mlp.up_proj.weight'; correct config.json, or set model.allow_unused_weights=true")
    with pytest.raises(ConfigError, match=f"model.init_from: {directory}: {want}"):
        _validate(directory)
    with pytest.raises(CheckpointError, match=want):
        _load(directory)
    _validate(directory, "model.allow_unused_weights=true")
    model = _load(directory, allow_unused_weights=True)
    assert torch.equal(model.norm.weight, load_file(directory / "model.safetensors")["model.norm.weight"])

    tied = llama_dir(tmp_path / "tied", tie=True)  # a copy of the tied head is accounted for by the config
    _validate(_edit(tied, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})))


def _truncate_header(directory: Path) -> None:
    with open(directory / "model.safetensors", "r+b") as f:
        f.truncate(40)  # the 8-byte length, then part of the JSON header


def _corrupt_header(directory: Path) -> None:
    with open(directory / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"#not json#")


def _no_safetensors(directory: Path) -> None:
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")


@pytest.mark.parametrize("damage,message", [
    (lambda d: _edit(d, lambda t: t.pop("model.norm.weight")), r"{d}: missing tensor 'model.norm.weight'"),
    (lambda d: _edit(d, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.ones(32, 60)})),
     r"{d}/model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' has shape \(32, 60\), "
     r"expected \(32, 64\)"),
    (_no_safetensors, r"{d}: no model.safetensors or model.safetensors.index.json; it holds pytorch_model.bin: "
     "megaring reads safetensors only, convert it"),
    (_corrupt_header, r"{d}/model.safetensors: cannot read the safetensors file \(.*header"),
    (_truncate_header, r"{d}/model.safetensors: cannot read the safetensors file \(.*header"),
], ids=["missing_tensor", "wrong_shape", "no_safetensors", "corrupted_header", "truncated_header"])
def test_a_bad_checkpoint_is_a_config_error_before_any_collective(tmp_path, damage, message):
    directory = llama_dir(tmp_path / "hf")
    damage(directory)
    with pytest.raises(ConfigError, match=r"\n  - model.init_from: " + message.format(d=directory)) as err:
        _validate(directory)
    assert str(err.value).count("\n  - ") == 1  # the one problem, on one line


def test_a_qwen2_checkpoint_without_biases_says_so(tmp_path):
    directory = _edit(qwen2_dir(tmp_path / "qwen"), lambda t: [t.pop(k) for k in list(t) if k.endswith(".bias")])
    with pytest.raises(ConfigError) as err:
        _validate(directory)
    text = str(err.value)
    assert f"{directory}: 6 tensors missing: 'model.layers.0.self_attn.q_proj.bias'" in text and "and 1 more" in text
    assert "every one a bias" in text and "correct 'architectures'" in text and text.count("\n  - ") == 1


def test_a_value_of_the_wrong_type_in_config_json_names_key_value_and_type(tmp_path):
    directory = llama_dir(tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config.update(num_key_value_heads="four", tie_word_embeddings="no", num_hidden_layers=True)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        model_config_from_hf(directory)
    text = str(err.value)
    assert text.startswith(f"{directory / 'config.json'}: cannot map to a megaring model (fix config.json)")
    assert 'num_key_value_heads="four" must be an integer (or null)' in text
    assert 'tie_word_embeddings="no" must be true or false (or null)' in text
    assert "num_hidden_layers=true must be an integer" in text
    with pytest.raises(ConfigError, match='num_key_value_heads="four" must be an integer'):
        compose_cfg(*RUN, f"model.init_from={directory}")


def test_nan_and_inf_weights_are_named_as_they_are_loaded(tmp_path):
    def poison(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("nan")
        tensors["model.layers.1.mlp.down_proj.weight"][0, -1] = float("inf")

    directory = _edit(llama_dir(tmp_path / "hf"), poison)
    with pytest.raises(CheckpointError) as err:
        _load(directory)
    text = str(err.value)
    assert f"2 tensors of {directory / 'model.safetensors'} hold NaN or inf values: " \
           "'model.layers.0.self_attn.k_proj.weight', 'model.layers.1.mlp.down_proj.weight'" in text
    assert "The checkpoint is damaged (no learning rate gives finite losses from it)" in text


def test_a_bad_input_error_is_exit_2_and_its_message_without_a_traceback(tmp_path, monkeypatch, capsys):
    def bad_weights(cfg, run_dir, hydra_files=None):
        raise CheckpointError("cannot load the Hugging Face checkpoint: /ckpt: missing tensor 'x'")

    monkeypatch.setattr(spawn, "train", bad_weights)
    assert issubclass(CheckpointError, BadInput) and issubclass(ConfigError, BadInput)
    assert spawn.run_and_report(None, tmp_path, rank=1) == 2
    err = capsys.readouterr().err
    assert err == "megaring-train: cannot load the Hugging Face checkpoint: /ckpt: missing tensor 'x'\n"
    reason = spawn.reason_file(tmp_path, 1)
    assert spawn.run_and_report(None, tmp_path, rank=1, reason=reason) == 2  # a spawned worker: to the parent
    assert capsys.readouterr().err == "" and reason.read_text() == err


def test_the_spawner_reports_each_reason_once_and_blames_the_input_error(tmp_path):
    for rank, text in ((0, "bad weights"), (1, "bad weights"), (3, "other weights")):
        spawn.reason_file(tmp_path, rank).write_text(text + "\n")
    assert spawn.worker_reasons(tmp_path, 1, 4) == ["bad weights", "other weights"]
    assert spawn.worker_reasons(tmp_path, 3, 4) == ["other weights", "bad weights"]
    # rank 2 crashed first (its peer left), rank 3 stopped on bad input: rank 3 is the cause
    assert spawn.blamed_failure((2, 1), [None, None, 1, 2], tmp_path) == (3, 2)
    assert spawn.blamed_failure((2, 1), [None, None, 1, 3], tmp_path) == (2, 1)  # diverged: no input error
    assert spawn.blamed_failure((0, 2), [2, 1, None, None], tmp_path) == (0, 2)
