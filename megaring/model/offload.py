"""Activation checkpoints in host memory: each checkpointed layer's saved input lives on the CPU.

With activation checkpointing a layer keeps only its input ``(B, S[/tp], dim)`` for the backward;
at a million tokens and 32+ layers those inputs alone are many GB. ``offloaded_checkpoint`` runs the
layer under a reentrant checkpoint whose saved inputs pass through ``saved_tensors_hooks`` that copy
them to pinned host memory (asynchronously, on the current stream) in the forward and back to the
device in the backward (as ALST's checkpoint offload does). On CPU there is nothing to move: the
layer is checkpointed as usual and the log says so once.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def _pack_to_host(x: torch.Tensor):
    if not x.is_cuda:
        return x.device, x
    host = torch.empty(x.shape, dtype=x.dtype, layout=x.layout, pin_memory=True)
    host.copy_(x, non_blocking=True)  # ordered before any later use of x's memory on this stream
    return x.device, host


def _unpack_to_device(packed) -> torch.Tensor:
    device, x = packed
    return x if x.device == device else x.to(device, non_blocking=True)


@functools.cache
def _say_cpu_once() -> None:
    log.info("model.checkpoint_offload: the activations are in host memory already, nothing to offload "
             "(plain activation checkpointing)")


def offloaded_checkpoint(layer, *args) -> torch.Tensor:
    """``layer(*args)`` checkpointed, its saved inputs in host memory until the backward (CUDA)."""
    if not any(torch.is_tensor(a) and a.is_cuda for a in args):
        _say_cpu_once()
        return checkpoint(layer, *args, use_reentrant=False)
    with saved_tensors_hooks(_pack_to_host, _unpack_to_device):
        return checkpoint(layer, *args, use_reentrant=True)
