"""A memory and step-time model of one training step per rank (no torch.distributed, no tensors).

Peak bytes per rank = states - grads + max(grads, live grads + saved + transient): the activation
peak meets only the gradients the backward has made by then (the output layer's, the last layer's),
the optimizer step meets all of them and no activations. ``n = dp * cp`` is the ZeRO group, ``P`` the
parameters, ``b`` the bytes of the compute dtype (4 float32, 2 bfloat16), ``T = micro * seq / cp``
the tokens a rank holds, ``s = tp`` with sequence parallelism (else 1), ``H, H_kv, D, F, V`` the
heads, kv heads, head dim, MLP hidden dim and vocabulary. Every term is a tensor the code keeps
(bytes per token)::

    states  = P / tp * (b w + b g + o)   weights, grads, optimizer (fp32 master if b < 4, Adam m, v)
              w = 1/n at stage 3, g = 1/n at stage >= 2, o = (8 + 4 m) / n at stage >= 1,
              m = 1 for an fp32 master copy: b < 4, or ZeRO 1-2 (DeepSpeed copies its partition)
    saved   = T * (L * layer + outside)          without checkpointing
            = T * (L * dim / s * b + outside)    with it (each layer's input)
      layer   = 2 norm + attention + mlp
      norm    = dim / s * (4 + b) + dim * b + 4 / s   RMSNorm: float32 input and normalised (b) rows, the
                                                      (gathered) output the next matmul saves, 1 / rms
      attn    = ((3 H + 2 H_kv) D b + 4 H) / tp       q, k, v (heads-major copies), output (heads-major),
                                                      float32 lse (ring attention's); the output's
                                                      token-major copy (W_o's input)
      mlp     = 4 F b / tp                            w13 output (2 F), silu, product; 0 with mlp_chunk
      outside = norm + 2 D b + 40                     final norm, rope cos/sin, the batch (4 x int64), losses
    transient = the larger of the two moments the saved activations meet the most working memory:
      end of forward   T_c * V / tp * (b + 4 + 4 [b < 4])   one chunk of logits (T_c = loss_chunk or T),
                                                           its float32 copy and the shifted exp / softmax
      the last layer's backward
                       (layer if checkpointing: the recomputed layer) + 2 dim b (the residual stream's
                       gradient, the block input's) - norm (the final norm's rows: its backward has
                       run and freed them) + the larger of two moments that never coexist:
                         the MLP's backward: 3 F b / tp (the SwiGLU's gradients; per tile with
                           mlp_chunk, plus the tile's recomputed 4 F b / tp)
                         the attention's, at cp > 1: 4 H_kv D (b + 4) / tp (the ring's K/V blocks and
                           float32 dK/dV accumulators, each in flight both ways) - norm - mlp (the MLP
                           and ffn norm have freed what they saved)

The formulas count what the code in megaring.model keeps, not allocator slack or the host process
(interpreter, torch, CUDA context): validated against measured steps in docs/benchmarks.md. Step time
= compute / throughput + the communication not hidden: tp all-reduces (4 per layer, forward + backward),
the ring's K/V passes (forward and backward, overlapped with compute: only the excess counts) and the
dp_cp gradient reduce.
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
    """One device and its links, for the memory and step model here and the attention cost model of
    :mod:`megaring.plan.cp`; link speeds are GB/s per device per direction."""

    memory_bytes: float = 80e9
    dtype_bytes: int = 2
    tflops: float = 400.0  # sustained matmul throughput per device
    intra_gbps: float = 300.0  # GB/s per device for tp / cp traffic
    inter_gbps: float = 25.0  # GB/s per device for the dp_cp gradient reduce
    reserved_bytes: float = 0.0  # per device, not for the step: CUDA context, or on CPU the host process
    gpus_per_node: int = 8  # devices that share the fast links (megaring.plan.cp: where a group crosses nodes)
    latency_us: float = 10.0  # per message


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    states: float
    saved: float
    transient: float
    step_s: float
    grads: float = 0.0  # all the weight gradients (part of states): with the optimizer step, no activations
    live_grads: float = 0.0  # those that exist at the activation peak (the output layer's, the last layer's)

    @property
    def peak(self) -> float:
        """The larger of the activation peak (with the gradients that exist by then) and the optimizer step."""
        return self.states - self.grads + max(self.grads, self.live_grads + self.saved + self.transient)

    @property
    def step(self) -> float:
        """What a step allocates at its peak over what stays resident between steps (measured as step_mem_gib)."""
        return self.peak - (self.states - self.grads)


def state_bytes(cfg: ModelConfig, lay: Layout, b: int) -> float:
    p, n = num_params(cfg) / lay.tp, lay.dp * lay.cp
    weights = p * b / (n if lay.zero_stage >= 3 else 1)
    # Adam's m and v, plus an fp32 master copy: always below float32, and at ZeRO 1-2 in float32
    # too (DeepSpeed clones each partition into its own fp32 buffer; stage 3 reuses a float32 one).
    master = b < 4 or lay.zero_stage in (1, 2)
    optim = p * (8 + (4 if master else 0)) / (n if lay.zero_stage >= 1 else 1)
    return weights + grad_bytes(cfg, lay, b) + optim


def grad_bytes(cfg: ModelConfig, lay: Layout, b: int) -> float:
    """The weight gradients: the part of the states a step allocates (none exist between steps)."""
    return num_params(cfg) / lay.tp * b / _grad_shards(lay)


def _grad_shards(lay: Layout) -> int:
    """Ranks the gradients are partitioned over: dp x cp from ZeRO-2."""
    return lay.dp * lay.cp if lay.zero_stage >= 2 else 1


def live_grad_bytes(cfg: ModelConfig, lay: Layout, b: int) -> float:
    """The gradients that exist at the activation peak: the backward has produced the output layer's
    (and the final norm's) by the logits' moment and the last layer's by its own; the rest come later,
    as the activations are freed."""
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    layer = (num_params(cfg) - embeddings - cfg.dim) / cfg.n_layers
    return (cfg.vocab_size * cfg.dim + layer + cfg.dim) / lay.tp * b / _grad_shards(lay)


def norm_bytes(cfg: ModelConfig, lay: Layout, b: int) -> float:
    """Per token: an RMSNorm's float32 input and normalised rows (this rank's tokens), 1 / rms, and
    the output as the next matmul saves it (all-gathered over tp with sequence parallelism)."""
    s = lay.tp if lay.sequence_parallel else 1
    return cfg.dim / s * (4 + b) + cfg.dim * b + 4 / s


def layer_bytes_per_token(cfg: ModelConfig, lay: Layout, b: int) -> float:
    """What one layer keeps for its backward, per token (the MLP's intermediates: none when tiled)."""
    attn = ((3 * cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim * b + 4 * cfg.n_heads) / lay.tp
    mlp = 0 if lay.mlp_chunk else 4 * cfg.hidden_dim * b / lay.tp
    return 2 * norm_bytes(cfg, lay, b) + attn + mlp


def layer_backward_bytes(cfg: ModelConfig, lay: Layout, b: int, tokens: int) -> float:
    """Working memory of the last layer's backward beyond what is saved: the recomputed layer
    (checkpointing), the residual stream's gradient and the gradient of the block's input (two rows),
    and the larger of the MLP's backward (the SwiGLU's gradients; per tile with mlp_chunk, plus the
    tile recomputed) and the attention's at cp > 1 (the ring's buffers), which never coexist: by the
    attention's backward the MLP's has freed its gradients, its saved intermediates and the ffn norm's rows."""
    recomputed = tokens * layer_bytes_per_token(cfg, lay, b) if lay.activation_checkpointing else 0.0
    mlp_tokens = min(lay.mlp_chunk, tokens) if lay.mlp_chunk else tokens
    mlp = mlp_tokens * 3 * cfg.hidden_dim * b / lay.tp
    if lay.mlp_chunk:
        mlp += mlp_tokens * 4 * cfg.hidden_dim * b / lay.tp  # the tile's recomputed intermediates
    mlp_saved = 0 if lay.mlp_chunk else 4 * cfg.hidden_dim * b / lay.tp
    ring = tokens * 4 * cfg.kv_heads * cfg.head_dim * (b + 4) / lay.tp if lay.cp > 1 else 0.0
    attention = ring - tokens * (norm_bytes(cfg, lay, b) + mlp_saved)
    return recomputed + tokens * 2 * cfg.dim * b + max(mlp, attention)


def estimate(cfg: ModelConfig, seq_len: int, micro_batch: int, lay: Layout, hw: Hardware) -> Estimate:
    b, tokens = hw.dtype_bytes, micro_batch * seq_len // lay.cp
    s = lay.tp if lay.sequence_parallel else 1
    outside = norm_bytes(cfg, lay, b) + 2 * cfg.head_dim * b + 40  # final norm, rope tables, batch, losses
    if lay.activation_checkpointing:
        saved = tokens * (cfg.n_layers * cfg.dim / s * b + outside)
    else:
        saved = tokens * (cfg.n_layers * layer_bytes_per_token(cfg, lay, b) + outside)
    vocab_local = -(-cfg.vocab_size // lay.tp)
    loss_tokens = min(lay.loss_chunk, tokens) if lay.loss_chunk else tokens
    logits = loss_tokens * vocab_local * (b + 4 + (4 if b < 4 else 0))
    # By a layer's backward the final norm's backward has run and freed its rows.
    transient = max(logits, layer_backward_bytes(cfg, lay, b, tokens) - tokens * norm_bytes(cfg, lay, b))
    return Estimate(lay, state_bytes(cfg, lay, b), saved, transient, step_seconds(cfg, seq_len, micro_batch, lay, hw),
                    grad_bytes(cfg, lay, b), live_grad_bytes(cfg, lay, b))


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
