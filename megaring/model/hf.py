"""Name and shape mapping between a full (1, 1) state dict and Hugging Face ``LlamaForCausalLM``.

No import of ``transformers`` here: the mapping is plain tensors and a dict of ``LlamaConfig``
arguments. Fused projections are split: ``wqkv -> q_proj, k_proj, v_proj`` and
``w13 -> gate_proj, up_proj``. RoPE already uses Hugging Face's rotate-half convention, so no
permutation of q/k rows is needed.
"""

from __future__ import annotations

import torch

from megaring.model.config import ModelConfig


def hf_llama_config_kwargs(cfg: ModelConfig, max_position_embeddings: int = 8192) -> dict:
    """Arguments of ``transformers.LlamaConfig`` for the same shape."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
        max_position_embeddings=max_position_embeddings, initializer_range=cfg.init_std,
    )


def _layer_to_hf(state: dict, i: int, cfg: ModelConfig) -> dict:
    src, dst = f"layers.{i}.", f"model.layers.{i}."
    qkv_sizes = [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    out = {dst + "input_layernorm.weight": state[src + "attention_norm.weight"],
           dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"]}
    for kind in ("weight", "bias"):
        if src + f"attention.wqkv.{kind}" in state:
            q, k, v = state[src + f"attention.wqkv.{kind}"].split(qkv_sizes, dim=0)
            out.update({dst + f"self_attn.q_proj.{kind}": q, dst + f"self_attn.k_proj.{kind}": k,
                        dst + f"self_attn.v_proj.{kind}": v, dst + f"self_attn.o_proj.{kind}":
                        state[src + f"attention.wo.{kind}"]})
        if src + f"feed_forward.w13.{kind}" in state:
            gate, up = state[src + f"feed_forward.w13.{kind}"].chunk(2, dim=0)
            out.update({dst + f"mlp.gate_proj.{kind}": gate, dst + f"mlp.up_proj.{kind}": up,
                        dst + f"mlp.down_proj.{kind}": state[src + f"feed_forward.w2.{kind}"]})
    return out


def to_hf_llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full megaring state dict (see ``gather_full_state_dict``) under ``LlamaForCausalLM`` names."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    out["lm_head.weight"] = state["tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"]
    for i in range(cfg.n_layers):
        out.update(_layer_to_hf(state, i, cfg))
    return {k: v.contiguous() for k, v in out.items()}
