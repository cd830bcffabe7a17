"""Sequence tiling with recomputation: a token-wise function over tiles, one tile's activations at a time.

``tiled(fn, x, params, tile)`` computes ``cat_j fn(x[:, tile_j], *params)`` along the sequence dim
(dim 1) without keeping any tile's intermediates: the forward runs under ``no_grad`` and saves only
``x``; the backward recomputes each tile with grad and accumulates ``dx`` (written into its tile)
and the parameters' grads (summed over tiles). ``fn`` must be token-wise (each output token depends
only on the same input token) and must not communicate: the tp regions stay outside (ALST's
TiledMLP does the same for the MLP, whose ``(B, S, 2 F / tp)`` intermediates dominate long sequences).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile, x, *params):
        with torch.no_grad():
            out = torch.cat([fn(x[:, s:s + tile], *params) for s in range(0, x.shape[1], tile)], dim=1)
        ctx.fn, ctx.tile = fn, tile
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grads = [None] * len(params)
        detached = [p.detach().requires_grad_(p.requires_grad) for p in params]
        wants = [p for p in detached if p.requires_grad]
        for s in range(0, x.shape[1], ctx.tile):
            x_tile = x[:, s:s + ctx.tile].detach().requires_grad_()
            with torch.enable_grad():
                out = ctx.fn(x_tile, *detached)
            tile_grads = torch.autograd.grad(out, [x_tile, *wants], grad_out[:, s:s + ctx.tile])
            grad_x[:, s:s + ctx.tile] = tile_grads[0]
            it = iter(tile_grads[1:])
            for i, p in enumerate(detached):
                if p.requires_grad:
                    g = next(it)
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
        return None, None, grad_x, *grads


def tiled(fn: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor | None],
          tile: int) -> torch.Tensor:
    """``fn(x, *params)`` over tiles of ``tile`` tokens of ``x`` ``(B, S, ...)``, recomputed in backward.

    ``None`` params (absent biases) are passed through. One tile (``tile >= S``) still recomputes.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1 token, got {tile}")
    present = [p for p in params if p is not None]
    slots = [p is not None for p in params]

    def fn_present(x_tile, *given):
        it = iter(given)
        return fn(x_tile, *(next(it) if slot else None for slot in slots))

    return _Tiled.apply(fn_present, tile, x, *present)


def swiglu(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
    """The local part of the tp SwiGLU: ``silu(x W_1) * (x W_3)`` then ``W_2`` (a partial sum over tp)."""
    gate, up = F.linear(x, w13, b13).chunk(2, dim=-1)  # (B, s, F / tp) each
    return F.linear(F.silu(gate) * up, w2)  # (B, s, dim)
