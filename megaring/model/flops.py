"""Parameter counts and the model-FLOPs formula used for MFU.

Per token, forward + backward (backward = 2x forward), counting a multiply-add as 2 FLOPs::

    flops_per_token = 6 * N_matmul + 6 * n_layers * n_heads * head_dim * seq_len

``N_matmul`` is the number of weights in matmuls: per layer ``dim * (H + 2 H_kv) * D`` (qkv),
``H * D * dim`` (wo) and ``3 * dim * ffn_dim`` (SwiGLU), plus ``vocab * dim`` for the output
layer (the embedding lookup is not a matmul; norms and biases are negligible). The attention
term counts ``Q K^T`` and ``P V`` (``2 * 2 * seq_len * H * D`` per token and layer without a
mask) halved for the causal mask, times 3 for forward + backward. The trainer passes the keys a query
actually sees (``visible_keys``: packed documents and windows), not dense causal attention over
the whole sample; no
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


def model_flops_per_token(cfg: ModelConfig, seq_len: int, visible_keys: float | None = None) -> int:
    """Training FLOPs per token at sample length ``seq_len`` (see the module docstring).

    ``visible_keys``: the mean number of keys a query actually sees (documents, windows: the
    trainer measures it every step); None: dense causal attention over the sample (``seq_len / 2``).
    """
    n_matmul = cfg.n_layers * layer_matmul_params(cfg) + cfg.vocab_size * cfg.dim
    keys = seq_len / 2 if visible_keys is None else visible_keys
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys  # Q K^T and P V, x3 for fwd + bwd
    return int(6 * n_matmul + attention)
