"""Block attention kernels behind one interface (see :mod:`megaring.kernels.base`).

``select_kernel(name, q, mask)`` picks one: a forced name, or automatically the fastest
kernel that supports the inputs (flash-attn, then torch CUDA on GPUs; torch's fused CPU
flash op on CPUs), falling back to the pure-torch reference.
"""

from __future__ import annotations

import torch

from megaring.kernels.base import BlockKernel
from megaring.kernels.cpu_flash import CpuFlashKernel
from megaring.kernels.cuda import FlashAttnKernel, TorchCudaKernel
from megaring.kernels.reference import TorchKernel

KERNELS: dict[str, BlockKernel] = {
    k.name: k for k in (TorchKernel(), CpuFlashKernel(), TorchCudaKernel(), FlashAttnKernel())
}
_AUTO_ORDER = {"cuda": ("flash_attn", "cuda", "torch"), "cpu": ("cpu_flash", "torch")}


def select_kernel(name: str | None, q: torch.Tensor, needs_mask: bool) -> BlockKernel:
    """The kernel to use for blocks of ``q``; ``needs_mask`` if any block carries a boolean mask."""
    probe = torch.ones(1, dtype=torch.bool) if needs_mask else None
    if name is not None:
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)} or None")
        kernel = KERNELS[name]
        if not kernel.supports(q, probe):
            raise ValueError(f"attention kernel {name!r} does not support {q.dtype} on {q.device.type}"
                             f"{' with a mask' if needs_mask else ''}")
        return kernel
    for candidate in _AUTO_ORDER.get(q.device.type, ("torch",)):
        if KERNELS[candidate].supports(q, probe):
            return KERNELS[candidate]
    return KERNELS["torch"]


__all__ = ["KERNELS", "BlockKernel", "select_kernel"]
