"""model.checkpoint_offload on CUDA: the checkpoints go to host memory and the gradients do not change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaring.model import ModelConfig, ParallelContext, build_model


@pytest.mark.gpu
def test_offloaded_checkpoints_keep_the_gradients_and_free_device_memory():
    cfg = dataclasses.replace(ModelConfig(), n_layers=4, activation_checkpointing=True)
    tokens = torch.randint(0, cfg.vocab_size, (1, 4096), device="cuda")
    positions = torch.arange(4096, device="cuda")[None]
    results = []
    for offload in (False, True):
        model = build_model(dataclasses.replace(cfg, checkpoint_offload=offload), ParallelContext.single()).cuda()
        losses = model(tokens, positions, labels=tokens)
        kept = torch.cuda.memory_allocated()
        losses.sum().backward()
        results.append((kept, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert results[1][0] < results[0][0]  # the layer inputs are in host memory
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6)
