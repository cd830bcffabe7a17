"""The (1, 1) model against Hugging Face ``LlamaForCausalLM`` with the same weights (skipped without
``transformers``, the ``bench`` extra): same logits and loss, float32, tolerance 1e-5 relative."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaring.hf.names import hf_llama_config_kwargs, to_hf_llama_state_dict
from megaring.model import (
    IGNORE_INDEX,
    ModelConfig,
    ParallelContext,
    build_model,
    count_valid_tokens,
    gather_full_state_dict,
    load_full_state_dict,
    local_loss,
    vocab_parallel_cross_entropy,
)

transformers = pytest.importorskip("transformers")
RTOL = 1e-5


@pytest.mark.parametrize("variant", [{}, dict(tie_embeddings=True, attention_bias=True, mlp_bias=True,
                                               rope_theta=500000.0)], ids=["plain", "tied_bias"])
def test_matches_hf_llama(variant):
    cfg = dataclasses.replace(ModelConfig(), **variant)
    ctx = ParallelContext.single()
    model = build_model(cfg, ctx, seed=1)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in gather_full_state_dict(model, ctx).items()}
    load_full_state_dict(model, state, ctx)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config_kwargs(cfg)))
    hf.load_state_dict(to_hf_llama_state_dict(state, cfg), strict=True)

    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    positions = torch.arange(32).expand(2, 32)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX  # HF shifts labels itself and drops the last position
    logits = model(tokens, positions)
    loss = local_loss(vocab_parallel_cross_entropy(logits, labels, ctx.tp), count_valid_tokens(labels))
    hf_out = hf(input_ids=tokens, labels=tokens)
    assert ((logits - hf_out.logits).norm() / hf_out.logits.norm()).item() <= RTOL
    assert abs(loss.item() - hf_out.loss.item()) <= RTOL * hf_out.loss.item()
