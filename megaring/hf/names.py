"""Names and shapes between megaring's full (1, 1) state dict and Hugging Face ``*ForCausalLM`` tensors.

No import of ``transformers`` here: plain tensors and names. Fused projections are split::

    layers.i.attention.wqkv     = [q_proj; k_proj; v_proj]      (rows)
    layers.i.feed_forward.w13   = [gate_proj; up_proj]          (rows)

and the rest map one to one (``wo -> o_proj``, ``w2 -> down_proj``, norms, embeddings,
``output -> lm_head``). RoPE already uses Hugging Face's rotate-half convention, so no
permutation of q/k rows is needed. Llama, Mistral and Qwen2 share these names.
"""

from __future__ import annotations

import re

import torch

from megaring.model.config import ModelConfig

GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w2": "mlp.down_proj",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def hf_sources(name: str, cfg: ModelConfig) -> list[tuple[str, int]]:
    """The Hugging Face tensors whose concatenation along dim 0 is megaring parameter ``name``,
    each with its size along dim 0. Raises ``KeyError`` for a name that is not a model parameter."""
    if name in GLOBAL_NAMES:
        return [(GLOBAL_NAMES[name], cfg.vocab_size if name != "norm.weight" else cfg.dim)]
    match = _LAYER.fullmatch(name)
    if match is None:
        raise KeyError(name)
    i, rest = match.groups()
    prefix = f"model.layers.{i}."
    module, _, kind = rest.rpartition(".")
    hd = cfg.head_dim
    if module == "attention.wqkv":
        sizes = (cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", n) for p, n in zip("qkv", sizes)]
    if module == "feed_forward.w13":
        return [(f"{prefix}mlp.{p}_proj.{kind}", cfg.hidden_dim) for p in ("gate", "up")]
    if rest in LAYER_NAMES:  # norms: (dim,)
        return [(prefix + LAYER_NAMES[rest], cfg.dim)]
    if module in LAYER_NAMES:  # wo, w2: weight (dim, in), bias (dim,)
        return [(f"{prefix}{LAYER_NAMES[module]}.{kind}", cfg.dim)]
    raise KeyError(name)


def to_hf_state_dict(
    state: dict[str, torch.Tensor], cfg: ModelConfig, *, include_tied_head: bool = False
) -> dict[str, torch.Tensor]:
    """A full megaring state dict (see ``gather_full_state_dict``) under Hugging Face names.

    ``lm_head.weight`` appears for untied models, and for tied ones only with ``include_tied_head``
    (``nn.Module.load_state_dict`` wants it; checkpoints on disk leave it out). Fused tensors are
    split into views: clone before writing them to disk.
    """
    out = {}
    for name, tensor in state.items():
        sources = hf_sources(name, cfg)
        sizes = [n for _, n in sources]
        parts = tensor.split(sizes, dim=0) if len(sources) > 1 else (tensor,)
        out.update({hf: part for (hf, _), part in zip(sources, parts)})
    if cfg.tie_embeddings and include_tied_head:
        out["lm_head.weight"] = state["tok_embeddings.weight"]
    return out


def hf_llama_config_kwargs(cfg: ModelConfig, max_position_embeddings: int | None = None) -> dict:
    """Arguments of ``transformers.LlamaConfig`` for the same shape (tests and benchmarks)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
        max_position_embeddings=max_position_embeddings or cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
    )


def to_hf_llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM.load_state_dict`` input: :func:`to_hf_state_dict` with the tied head, contiguous."""
    return {k: v.contiguous() for k, v in to_hf_state_dict(state, cfg, include_tied_head=True).items()}
