"""Kernel plumbing that CI can check without a GPU: CUDA op signatures on the meta device, and the
self-check that guards automatically chosen GPU kernels."""

from __future__ import annotations

import pytest
import torch

from megaring.kernels import KERNELS, kernel_error
from megaring.kernels.cuda import TorchCudaKernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_kernel_calls_match_op_schemas(dtype, masked):
    # The meta device runs torch's shape functions for the CUDA flash / efficient ops: a wrong
    # argument list or shape (GQA expansion, padded lse) fails here.
    kernel = TorchCudaKernel()
    q = torch.empty(2, 50, 8, 64, device="meta", dtype=dtype)
    kv = torch.empty(2, 50, 2, 64, device="meta", dtype=dtype)
    mask = torch.ones(2, 50, 50, dtype=torch.bool, device="meta") if masked else None
    out, lse = kernel.forward(q, kv, kv, scale=0.125, causal=True, mask=mask)
    assert out.shape == q.shape and lse.shape == (2, 8, 50) and lse.dtype == torch.float32
    dq, dk, dv = kernel.backward(q, q, kv, kv, out, lse, scale=0.125, causal=True, mask=mask)
    assert dq.shape == q.shape and dk.shape == kv.shape and dv.shape == kv.shape


@pytest.mark.parametrize("masked", [False, True])
def test_self_check_accepts_a_correct_kernel(masked):
    assert kernel_error(KERNELS["cpu_flash"], KERNELS["torch"], "cpu", torch.float32, 16, masked) < 1e-4


def test_self_check_rejects_a_wrong_kernel():
    class Wrong(type(KERNELS["torch"])):
        def forward(self, q, k, v, **kw):
            out, lse = super().forward(q, k, v, **kw)
            return out * 1.01, lse

    assert kernel_error(Wrong(), KERNELS["torch"], "cpu", torch.float32, 16, False) > 1e-3
