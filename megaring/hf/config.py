"""Hugging Face ``config.json`` <-> :class:`~megaring.model.config.ModelConfig`.

Supported: ``LlamaForCausalLM`` (Llama 2, 3, 3.1, 3.2, tied or not), ``MistralForCausalLM`` and
``Qwen2ForCausalLM`` (q/k/v biases, no o_proj bias). RoPE is read in both forms transformers
has written: ``rope_parameters`` (transformers 5: ``rope_theta`` and ``rope_type`` inside) and
the older top-level ``rope_theta`` + ``rope_scaling`` (``type`` or ``rope_type``). Problems are
collected and raised as one ``ValueError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megaring.model.config import ROPE_TYPES, ModelConfig
from megaring.model.rope import ROPE_PARAMETER_KEYS

ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Overrides that may differ from the checkpoint: they change neither a shape nor a learned value.
ALLOWED_OVERRIDES = ("rope_theta", "rope_scaling", "activation_checkpointing", "max_position_embeddings",
                     "init_std", "name", "init_from", "bos_token_id", "eos_token_id",
                     "checkpoint_offload", "loss_chunk", "mlp_chunk", "compile", "allow_unused_weights")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Every config.json value that is read: (test, the type to write). null is fine for the optional keys.
_INT, _NUMBER = (_is_int, "an integer"), (_is_number, "a number")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
VALUE_TYPES = {
    **dict.fromkeys((*_REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                     "bos_token_id"), _INT),
    **dict.fromkeys(("rms_norm_eps", "initializer_range", "rope_theta", "partial_rotary_factor"), _NUMBER),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"), _BOOL),
    "eos_token_id": (lambda v: _is_int(v) or isinstance(v, list) and all(map(_is_int, v)),
                     "an integer or a list of integers"),
    "hidden_act": (lambda v: isinstance(v, str), "a string"),
    **dict.fromkeys(("rope_parameters", "rope_scaling"), (lambda v: isinstance(v, dict), "a mapping")),
    "architectures": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of class names"),
}


def read_hf_config(source: str | Path | dict) -> tuple[dict, str]:
    """``(config dict, where)`` from a checkpoint directory, a ``config.json`` path or a dict."""
    if isinstance(source, dict):
        return dict(source), "<config dict>"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a Hugging Face checkpoint directory needs a config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON config ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON config (a {type(raw).__name__}, not an object of keys)")
    return raw, str(path)


def type_problems(raw: dict) -> list[str]:
    """One line per value of the wrong JSON type: the key, the value and the type expected."""
    out = []
    for key, (ok, expected) in VALUE_TYPES.items():
        value = raw.get(key)
        if (value is not None or key in _REQUIRED and key in raw) and not ok(value):
            out.append(f"{key}={json.dumps(value)} must be {expected}" + ("" if key in _REQUIRED else " (or null)"))
    for key in ("rope_parameters", "rope_scaling"):
        theta = raw[key].get("rope_theta") if isinstance(raw.get(key), dict) else None
        if theta is not None and not _is_number(theta):
            out.append(f"{key}.rope_theta={json.dumps(theta)} must be a number")
    return out


def _architecture(raw: dict, problems: list[str]) -> str:
    names = {cls: arch for arch, cls in ARCHITECTURE_CLASSES.items()}
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in ARCHITECTURE_CLASSES:
        return raw["model_type"]
    if len(archs) != 1 or archs[0] not in names:
        problems.append(f"architecture {archs or raw.get('model_type')!r} is not supported "
                        f"(supported: {', '.join(names)})")
        return "llama"
    return names[archs[0]]


def rope_from_hf(raw: dict, problems: list[str]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either RoPE form; ``rope_scaling`` None for plain RoPE."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    params = dict(params)
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        problems.append(f"partial_rotary_factor={partial} is not supported (RoPE on the whole head only)")
    unknown = sorted(set(params) - set(ROPE_PARAMETER_KEYS))
    if unknown:
        problems.append(f"unknown RoPE parameters {unknown} (rope type {rope_type!r})")
    kept = {k: v for k, v in params.items() if v is not None and k in ROPE_PARAMETER_KEYS}
    if rope_type == "default" and not kept:
        return theta, None
    return theta, {"rope_type": rope_type, **kept}


def _sliding_window(raw: dict, arch: str) -> int | None:
    if arch == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    return raw.get("sliding_window") if arch in ("mistral", "qwen2") else None


def model_config_from_hf(source: str | Path | dict) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face checkpoint (directory, ``config.json`` or dict).

    ``init_from`` is set to the directory when one is given. Raises one ``ValueError`` naming the
    file: an unsupported architecture alone (another model family's keys would bury it), else every
    problem (missing keys and values of the wrong type first; then RoPE, head_dim).
    """
    raw, where = read_hf_config(source)
    problems: list[str] = []
    arch = _architecture(raw, problems)
    if problems:  # another model family: its keys would only bury the one line that matters
        raise ValueError(f"{where}: {problems[0]}")
    problems = [f"missing key {k!r}" for k in _REQUIRED if k not in raw]
    if type_problems(raw):  # (the checks below read these values)
        problems += type_problems(raw)
        raise ValueError(f"{where}: cannot map to a megaring model (fix config.json):\n  - " + "\n  - ".join(problems))
    theta, scaling = rope_from_hf(raw, problems)
    if problems:
        raise ValueError(f"{where}: cannot map to a megaring model:\n  - " + "\n  - ".join(problems))
    dim, heads = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != dim:
        problems.append(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = {dim}/{heads}: "
                        "megaring needs head_dim * heads == hidden_size")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={raw['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if problems:
        raise ValueError(f"{where}: cannot map to a megaring model:\n  - " + "\n  - ".join(problems))
    directory = None if isinstance(source, dict) else str(Path(where).parent)
    return ModelConfig(
        name=Path(directory).name if directory else raw.get("_name_or_path") or arch,
        vocab_size=raw["vocab_size"], dim=dim, n_layers=raw["num_hidden_layers"], n_heads=heads,
        n_kv_heads=raw.get("num_key_value_heads") or heads, ffn_dim=raw["intermediate_size"],
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "llama" and bool(raw.get("attention_bias", False)),
        qkv_bias=arch == "qwen2", mlp_bias=arch == "llama" and bool(raw.get("mlp_bias", False)),
        init_std=float(raw.get("initializer_range", 0.02)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
        sliding_window=_sliding_window(raw, arch), architecture=arch, init_from=directory,
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
    )


def export_problems(cfg: ModelConfig) -> list[str]:
    """What a Hugging Face architecture class cannot express about ``cfg``."""
    out = []
    if cfg.architecture not in ARCHITECTURE_CLASSES:
        out.append(f"model.architecture={cfg.architecture!r} has no Hugging Face class")
    if cfg.architecture == "llama" and cfg.qkv_bias and not cfg.attention_bias:
        out.append("LlamaForCausalLM has no q/k/v-only bias (model.qkv_bias): use architecture=qwen2")
    if cfg.architecture == "mistral" and (cfg.attention_bias or cfg.qkv_bias or cfg.mlp_bias):
        out.append("MistralForCausalLM has no biases")
    if cfg.architecture == "qwen2" and (cfg.attention_bias or cfg.mlp_bias or not cfg.qkv_bias):
        out.append("Qwen2ForCausalLM has q/k/v biases only (model.qkv_bias=true, attention_bias/mlp_bias false)")
    return out


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def hf_config_dict(cfg: ModelConfig, *, dtype=None) -> dict:
    """The ``config.json`` of ``cfg`` (RoPE as transformers-5 ``rope_parameters``, real vocabulary)."""
    problems = export_problems(cfg)
    if problems:
        raise ValueError(f"cannot export model {cfg.name!r}:\n  - " + "\n  - ".join(problems))
    scaling = dict(cfg.rope_scaling or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("type", None)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": rope_type, **scaling}
    out = dict(
        architectures=[ARCHITECTURE_CLASSES[cfg.architecture]], model_type=cfg.architecture,
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope, attention_dropout=0.0, use_cache=True,
    )
    if cfg.architecture == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if cfg.architecture == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    if cfg.architecture == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
    out.update({k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id))
                if v is not None})
    if dtype is not None:
        out.update(dtype=_dtype_name(dtype), torch_dtype=_dtype_name(dtype))
    return out


def checkpoint_signature(cfg: ModelConfig) -> dict:
    """What a checkpoint fixes: shapes and the meaning of the learned values (not RoPE, not options)."""
    return dict(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                n_kv_heads=cfg.kv_heads, ffn_dim=cfg.hidden_dim, tie_embeddings=cfg.tie_embeddings,
                attention_bias=cfg.attention_bias, qkv_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                norm_eps=cfg.norm_eps, architecture=cfg.architecture, sliding_window=cfg.sliding_window)


def override_problems(hf_cfg: ModelConfig, overrides: dict) -> list[str]:
    """The ``model.*`` overrides (keys with or without ``model.``) that conflict with the checkpoint.

    Allowed freely: :data:`ALLOWED_OVERRIDES`. Together, the others must leave the checkpoint's
    shapes and semantics unchanged (e.g. ``ffn_dim=None`` with a ``multiple_of`` rule that gives
    the checkpoint's intermediate size is fine). One problem per changed quantity.
    """
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    where = f" ({hf_cfg.init_from})" if hf_cfg.init_from else ""
    named = {key.removeprefix("model."): value for key, value in overrides.items()}
    out = [f"model.{name} is not a model config field" for name in named if name not in fields]
    changes = {k: v for k, v in named.items() if k in fields and k not in ALLOWED_OVERRIDES}
    want, got = checkpoint_signature(hf_cfg), checkpoint_signature(dataclasses.replace(hf_cfg, **changes))
    for key in (k for k in want if got[k] != want[k]):
        if key in changes:
            out.append(f"model.{key}={changes[key]!r} conflicts with the checkpoint{where}: {key}={want[key]!r} there")
        else:
            out.append(f"model overrides {sorted(changes)} make {key}={got[key]!r}, "
                       f"the checkpoint{where} has {key}={want[key]!r}")
    return out
