"""CUDA block kernels against the pure-torch reference kernel (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from megaring import ring_attention
from megaring.kernels import KERNELS
from megaring.ring.dense_reference import masked_reference
from tests.helpers.attention_ref import make_inputs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["cuda", "flash_attn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_seg", [False, True])
def test_cuda_kernel_matches_reference(name, dtype, causal, with_seg):
    q, k, v, dout, seg = make_inputs(0, 2, 256, 8, 2, 64, with_seg)
    q, k, v, dout = (t.cuda().to(dtype) for t in (q, k, v, dout))
    seg = None if seg is None else seg.cuda()
    kernel = KERNELS[name]
    if not kernel.supports(q, None if seg is None else seg.bool()):
        pytest.skip(f"{name} does not support {dtype} / masks here")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, causal=causal, segment_ids=seg, kernel=name)
    out.backward(dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = masked_reference(qr, kr, vr, causal=causal, segment_ids=seg)
    ref.backward(dout.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for got, want in ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_apex_fused_rms_norm_matches_torch(dtype):
    from megaring.model.blocks import RMSNorm
    from megaring.model.context import ParallelContext

    if RMSNorm.fused is None:
        pytest.skip("apex is not installed")
    norm = RMSNorm(256, 1e-5, ParallelContext.single()).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(2, 64, 256, device="cuda", dtype=dtype, requires_grad=True)
    fused = norm(x)
    fused.sum().backward()
    fused_grads = (x.grad.clone(), norm.weight.grad.clone())
    x.grad = norm.weight.grad = None
    norm.fused = None  # the instance falls back to the torch path
    plain = norm(x)
    plain.sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: g applied before vs after rounding
    torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)
    for a, b in zip(fused_grads, (x.grad, norm.weight.grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
