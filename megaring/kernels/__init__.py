"""Block attention kernels behind one interface (see :mod:`megaring.kernels.base`).

``select_kernel(kernel, q, needs_mask)`` picks one: a kernel instance or a name as given, or automatically the fastest
kernel that supports the inputs (flash-attn, then torch CUDA on GPUs; torch's fused CPU
flash op on CPUs), falling back to the pure-torch reference. Automatically chosen GPU kernels
are checked against the reference on a small problem the first time they are used with a
(device, dtype, masking) combination; one that disagrees or fails is skipped with a warning.
"""

from __future__ import annotations

import warnings
from types import MappingProxyType

import torch

from megaring.kernels.base import BlockKernel
from megaring.kernels.cpu_flash import CpuFlashKernel
from megaring.kernels.cuda import FlashAttnKernel, TorchCudaKernel
from megaring.kernels.torch_kernel import TorchKernel

# Read-only: a test or benchmark that wants another kernel passes an instance to ring_attention.
KERNELS: MappingProxyType[str, BlockKernel] = MappingProxyType({
    k.name: k for k in (TorchKernel(), CpuFlashKernel(), TorchCudaKernel(), FlashAttnKernel())
})
_AUTO_ORDER = {"cuda": ("flash_attn", "cuda", "torch"), "cpu": ("cpu_flash", "torch")}


def select_kernel(kernel: str | BlockKernel | None, q: torch.Tensor, needs_mask: bool) -> BlockKernel:
    """The kernel to use for blocks of ``q``; ``needs_mask`` if any block carries a boolean mask."""
    probe = torch.ones(1, dtype=torch.bool) if needs_mask else None
    if kernel is not None:
        if not isinstance(kernel, BlockKernel):
            if kernel not in KERNELS:
                raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {sorted(KERNELS)} or None")
            kernel = KERNELS[kernel]
        if not kernel.supports(q, probe):
            raise ValueError(f"attention kernel {kernel.name!r} does not support {q.dtype} on {q.device.type}"
                             f"{' with a mask' if needs_mask else ''}")
        return kernel
    for candidate in _AUTO_ORDER.get(q.device.type, ("torch",)):
        kernel = KERNELS[candidate]
        if kernel.supports(q, probe) and (q.device.type == "cpu" or _checked(kernel, q, needs_mask)):
            return kernel
    return KERNELS["torch"]


_CHECKS: dict[tuple, bool] = {}


def _checked(kernel: BlockKernel, q: torch.Tensor, masked: bool) -> bool:
    """Whether ``kernel`` agrees with the reference on a small problem like ``q`` (cached)."""
    key = (kernel.name, str(q.device), q.dtype, q.shape[-1], masked)
    if key not in _CHECKS:
        try:
            error = kernel_error(kernel, KERNELS["torch"], q.device, q.dtype, q.shape[-1], masked)
            tol = 1e-4 if q.dtype in (torch.float32, torch.float64) else 3e-2
            _CHECKS[key] = error <= tol
            reason = f"max relative error {error:.3g} > {tol}"
        except Exception as err:  # noqa: BLE001 - any failure means: do not use this kernel
            _CHECKS[key] = False
            reason = f"{type(err).__name__}: {err}"
        if not _CHECKS[key]:
            warnings.warn(f"attention kernel {kernel.name!r} failed its self-check on {q.device} {q.dtype} "
                          f"({reason}); falling back", stacklevel=3)
    return _CHECKS[key]


def kernel_error(kernel: BlockKernel, reference: BlockKernel, device, dtype, head_dim: int, masked: bool) -> float:
    """Largest relative difference of out, lse, dq, dk, dv between two kernels on a causal GQA block."""
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 80, 4, head_dim, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, 80, 2, head_dim, generator=g).to(device, dtype) for _ in range(2))
    mask = (torch.arange(80, device=device) // 30)[None] if masked else None
    mask = None if mask is None else mask[:, :, None] == mask[:, None, :]
    args = dict(scale=head_dim**-0.5, causal=True, mask=mask)
    out, lse = reference.forward(q, k, v, **args)
    got_out, got_lse = kernel.forward(q, k, v, **args)
    grads = reference.backward(dout, q, k, v, out, lse, **args)
    got_grads = kernel.backward(dout, q, k, v, out, lse, **args)
    pairs = [(got_out, out), (got_lse, lse), *zip(got_grads, grads)]
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item() for a, b in pairs)


__all__ = ["KERNELS", "BlockKernel", "select_kernel"]
