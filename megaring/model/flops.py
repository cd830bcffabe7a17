"""Parameter counts and the model-FLOPs formula used for MFU.

Per token, forward + backward (backward = 2x forward), counting a multiply-add as 2 FLOPs::

    flops_per_token = 6 * N_matmul + 6 * n_layers * n_heads * head_dim * seq_len

``N_matmul`` is the number of weights in matmuls: per layer ``dim * (H + 2 H_kv) * D`` (qkv),
``H * D * dim`` (wo) and ``3 * dim * ffn_dim`` (SwiGLU), plus ``vocab * dim`` for the output
layer (the embedding lookup is not a matmul; norms and biases are negligible). The attention
term counts ``Q K^T`` and ``P V`` (``2 * 2 * seq_len * H * D`` per token and layer without a
mask) halved for the causal mask, times 3 for forward + backward. It uses the full sample
length even when packed documents mask part of the attention (the usual convention), and no
activation recomputation (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from megaring.model.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    hd = cfg.head_dim
    attention = cfg.dim * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * cfg.dim
    return attention + 3 * cfg.dim * cfg.hidden_dim


def num_params(cfg: ModelConfig) -> int:
    """Parameters of the model (tied embeddings counted once)."""
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    biases = cfg.n_layers * ((cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim * qkv_bias + cfg.dim * cfg.attention_bias)
    biases += cfg.n_layers * (2 * cfg.hidden_dim + cfg.dim) * cfg.mlp_bias
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * layer_matmul_params(cfg) + norms + biases + embeddings


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token at sample length ``seq_len`` (see the module docstring)."""
    n_matmul = cfg.n_layers * layer_matmul_params(cfg) + cfg.vocab_size * cfg.dim
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # 12 * L * H * D * T / 2 (causal)
    return 6 * n_matmul + attention
