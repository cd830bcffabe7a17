"""The transformer block of a Llama-family decoder, tensor-parallel over tp and ring-parallel over cp.

Inside a block every rank computes its own heads and its own slice of the SwiGLU intermediate
dim; the block reads like single-device code because the tp layers carry the communication.
Activations between blocks are ``(B, S, dim)``, or ``(B, S / tp, dim)`` with sequence parallelism
(``S`` is this cp rank's local sequence length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaring.model.config import ModelConfig
from megaring.model.context import ParallelContext
from megaring.model.rope import apply_rope
from megaring.model.tiling import swiglu, tiled
from megaring.ring.attention import ring_attention
from megaring.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region
from megaring.ulysses.attention import context_attention


def _apex_fused_rms_norm():
    """NVIDIA apex's fused RMSNorm (an optional extra, not on the package index), or None."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * g``, normalised in float32.

    With sequence parallelism the replicated ``g`` sees only this rank's tokens, so it enters
    through ``copy_to_tensor_model_parallel_region``: backward all-reduces its gradient over tp.
    On CUDA with apex installed the fused kernel computes the same (it also normalises in float32,
    and applies ``g`` before rounding to the input dtype rather than after).
    """

    fused = staticmethod(_apex_fused_rms_norm())

    def __init__(self, dim: int, eps: float, ctx: ParallelContext):
        super().__init__()
        self.eps, self.tp_axis = eps, ctx.tp
        self.sequence_parallel = ctx.sequence_parallel_active
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sequence_parallel:
            weight = copy_to_tensor_model_parallel_region(weight, self.tp_axis)
        if self.fused is not None and x.is_cuda and x.dtype == weight.dtype:
            return self.fused(x, weight, weight.shape, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * weight


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings; tp splits the q heads and the kv heads.

    ``[Q | K | V] = X [W_q | W_k | W_v]`` is one fused column-parallel matmul (rank i gets its
    ``H / tp`` query heads and ``H_kv / tp`` kv heads), context attention runs over cp on the local
    heads (Ulysses all-to-all inside, ring across; cp=1: plain attention), and the row-parallel
    ``W_o`` sums the heads' contributions over tp. Biases:
    ``attention_bias`` on all four (Llama), ``qkv_bias`` on the fused projection only (Qwen2).
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        tp, hd = ctx.tp.size, cfg.head_dim
        self.head_dim, self.n_local_heads, self.n_local_kv_heads = hd, cfg.n_heads // tp, cfg.kv_heads // tp
        self.ctx = ctx
        self.window = cfg.sliding_window  # Mistral-style: a query sees the last `window` keys of its document
        sp = ctx.sequence_parallel_active
        self.wqkv = ColumnParallelLinear(cfg.dim, (cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd),
                                         tp_axis=ctx.tp, bias=cfg.attention_bias or cfg.qkv_bias,
                                         sequence_parallel=sp)
        self.wo = RowParallelLinear(cfg.n_heads * hd, cfg.dim, tp_axis=ctx.tp, bias=cfg.attention_bias,
                                    sequence_parallel=sp)

    def forward(self, x, cos, sin, segment_ids, positions=None):
        qkv = self.wqkv(x)  # (B, S, (H_l + 2 H_kv_l) * D)
        b, s, _ = qkv.shape
        hd, h, h_kv = self.head_dim, self.n_local_heads, self.n_local_kv_heads
        q, k, v = qkv.split([h * hd, h_kv * hd, h_kv * hd], dim=-1)
        q = apply_rope(q.view(b, s, h, hd), cos, sin)  # (B, S, H_l, D)
        k = apply_rope(k.view(b, s, h_kv, hd), cos, sin)  # (B, S, H_kv_l, D)
        v = v.view(b, s, h_kv, hd)
        c = self.ctx  # cp=1: a size-1 axis, plain attention
        if c.cp_ulysses is not None and c.cp_ulysses.size > 1:  # Ulysses inside, the ring across
            out = context_attention(q, k, v, ulysses_group=c.cp_ulysses, ring_group=c.cp_ring, causal=True,
                                    segment_ids=segment_ids, layout=c.layout, kernel=c.attn_kernel,
                                    backward=c.ring_backward, settings=c.ring_settings,
                                    traffic=c.traffic)  # (B, S, H_l, D)
            return self.wo(out.reshape(b, s, h * hd))  # (B, S[/tp], dim)
        window = self.window if self.window is not None and self.window < s * c.cp.size else None
        out = ring_attention(q, k, v, group=c.cp, causal=True, segment_ids=segment_ids,
                             positions=positions if (window or c.layout == "balanced") else None, window=window,
                             layout=c.layout, kernel=c.attn_kernel, backward=c.ring_backward,
                             settings=c.ring_settings, traffic=c.traffic, routes=c.routes)  # (B, S, H_l, D)
        return self.wo(out.reshape(b, s, h * hd))  # (B, S[/tp], dim)


class FeedForward(nn.Module):
    """SwiGLU ``W_2 (silu(X W_1) * X W_3)``; tp splits the intermediate dim.

    ``[W_1 | W_3]`` is one fused column-parallel matmul, ``W_2`` is row-parallel.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        hidden, sp = cfg.hidden_dim, ctx.sequence_parallel_active
        self.tile = cfg.mlp_chunk  # tokens per tile of the tiled MLP (0: untiled)
        self.w13 = ColumnParallelLinear(cfg.dim, (hidden, hidden), tp_axis=ctx.tp, bias=cfg.mlp_bias,
                                        sequence_parallel=sp)
        self.w2 = RowParallelLinear(hidden, cfg.dim, tp_axis=ctx.tp, bias=cfg.mlp_bias, sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile:
            return self.tiled_forward(x)
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, S, F / tp) each
        return self.w2(F.silu(gate) * up)  # (B, S[/tp], dim)

    def tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same SwiGLU over sequence tiles of ``self.tile`` tokens, recomputed in backward: the
        ``(B, S, 2 F / tp)`` intermediates exist for one tile at a time (:mod:`megaring.model.tiling`)."""
        x = self.w13.enter(x)  # (B, S, dim): the tp region's communication stays outside the tiles
        partial = tiled(swiglu, x, (self.w13.weight, self.w13.bias, self.w2.weight), self.tile)  # (B, S, dim)
        return self.w2.reduce_partial(partial)  # (B, S[/tp], dim)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``h = x + Attn(norm(x))``, ``out = h + FFN(norm(h))``."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ctx)
        self.attention = Attention(cfg, ctx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, ctx)
        self.feed_forward = FeedForward(cfg, ctx)

    def forward(self, x, cos, sin, segment_ids, positions=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, segment_ids, positions)
        return h + self.feed_forward(self.ffn_norm(h))
