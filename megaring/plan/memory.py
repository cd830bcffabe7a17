"""A memory and step-time model of one training step per rank (no torch.distributed, no tensors).

Peak bytes per rank = states + activations, with ``n = dp * cp`` the ZeRO group, ``P`` the
parameters, ``b`` the bytes of the compute dtype (4 float32, 2 bfloat16) and ``T = micro * seq / cp``
the tokens a rank holds::

    states      = P / tp * (b * w + b * g + o)      weights, grads, optimizer (fp32 master if b < 4, Adam m, v)
                  w = 1/n at stage 3, g = 1/n at stage >= 2, o = (8 + 4 [b < 4]) / n at stage >= 1
    saved       = L * T * per_layer                 the activations kept for backward
                  per_layer = 2 dim / s + (2 (H + 2 H_kv) D + H D) / tp + 4 F / tp + dim / tp     (no checkpointing)
                            = dim / s                                                              (checkpointing)
                  s = tp with sequence parallelism, else 1; the MLP's 4 F / tp is per tile with mlp_chunk
    transient   = one layer's activations (recomputed in backward with checkpointing) + the logits:
                  T_c * V / tp * (b + 8)   (b logits, float32 softmax and its gradient), T_c = loss_chunk or T

All counts are elements per token times ``b`` (or 4 for the float32 loss); the formulas count what
the code in megaring.model keeps, not allocator slack. Step time = compute / throughput + the
communication not hidden: tp all-reduces (4 per layer, forward + backward), the ring's K/V passes
(forward and backward, overlapped with compute: only the excess counts) and the dp_cp gradient reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaring.model.config import ModelConfig
from megaring.model.flops import model_flops_per_token, num_params


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    loss_chunk: int = 0
    mlp_chunk: int = 0


@dataclass(frozen=True)
class Hardware:
    memory_bytes: float = 80e9
    dtype_bytes: int = 2
    tflops: float = 400.0  # sustained matmul throughput per device
    intra_gbps: float = 300.0  # GB/s per device for tp / cp traffic
    inter_gbps: float = 25.0  # GB/s per device for the dp_cp gradient reduce


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    states: float
    saved: float
    transient: float
    step_s: float

    @property
    def peak(self) -> float:
        return self.states + self.saved + self.transient


def state_bytes(cfg: ModelConfig, lay: Layout, b: int) -> float:
    p, n = num_params(cfg) / lay.tp, lay.dp * lay.cp
    weights = p * b / (n if lay.zero_stage >= 3 else 1)
    grads = p * b / (n if lay.zero_stage >= 2 else 1)
    optim = p * (8 + (4 if b < 4 else 0)) / (n if lay.zero_stage >= 1 else 1)
    return weights + grads + optim


def layer_elements_per_token(cfg: ModelConfig, lay: Layout, tokens: int) -> tuple[float, float]:
    """(elements kept per token per layer without checkpointing, of which the MLP intermediates)."""
    s = lay.tp if lay.sequence_parallel else 1
    attn = (2 * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim) / lay.tp
    mlp = 4 * cfg.hidden_dim / lay.tp
    if lay.mlp_chunk:
        mlp *= min(lay.mlp_chunk, tokens) / tokens  # one tile of intermediates, whatever T
    return 2 * cfg.dim / s + attn + mlp + cfg.dim / lay.tp, mlp


def estimate(cfg: ModelConfig, seq_len: int, micro_batch: int, lay: Layout, hw: Hardware) -> Estimate:
    b, tokens = hw.dtype_bytes, micro_batch * seq_len // lay.cp
    s = lay.tp if lay.sequence_parallel else 1
    per_layer, _ = layer_elements_per_token(cfg, lay, tokens)
    layer_bytes = tokens * per_layer * b
    if lay.activation_checkpointing:
        saved = cfg.n_layers * tokens * cfg.dim / s * b
        transient = layer_bytes
    else:
        saved, transient = cfg.n_layers * layer_bytes, 0.0
    vocab_local = -(-cfg.vocab_size // lay.tp)
    loss_tokens = min(lay.loss_chunk, tokens) if lay.loss_chunk else tokens
    transient += loss_tokens * vocab_local * (b + 8)
    return Estimate(lay, state_bytes(cfg, lay, b), saved, transient, step_seconds(cfg, seq_len, micro_batch, lay, hw))


def step_seconds(cfg: ModelConfig, seq_len: int, micro_batch: int, lay: Layout, hw: Hardware) -> float:
    b, tokens = hw.dtype_bytes, micro_batch * seq_len // lay.cp
    flops = model_flops_per_token(cfg, seq_len) * tokens / lay.tp
    if lay.activation_checkpointing:
        flops *= 4 / 3  # the forward again
    if lay.loss_chunk:
        flops += 2 * tokens * cfg.vocab_size * cfg.dim / lay.tp  # the logits again
    if lay.mlp_chunk:
        flops += 2 * 3 * tokens * cfg.dim * cfg.hidden_dim / lay.tp * cfg.n_layers  # the MLP forward again
    compute = flops / (hw.tflops * 1e12)
    tp_bytes = 4 * cfg.n_layers * tokens * cfg.dim * b * (lay.tp - 1) / lay.tp * 2 if lay.tp > 1 else 0.0
    kv = 2 * cfg.kv_heads * cfg.head_dim / lay.tp * tokens * b
    ring_bytes = 3 * cfg.n_layers * kv * (lay.cp - 1) if lay.cp > 1 else 0.0  # K/V forward, K/V + dK/dV backward
    ring_excess = max(0.0, ring_bytes / (hw.intra_gbps * 1e9) - compute * 0.5)
    n = lay.dp * lay.cp
    grad_bytes = 2 * num_params(cfg) / lay.tp * b * (n - 1) / n if n > 1 else 0.0
    return compute + tp_bytes / (hw.intra_gbps * 1e9) + ring_excess + grad_bytes / (hw.inter_gbps * 1e9)
