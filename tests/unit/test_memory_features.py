"""Memory and speed features on one process: chunked loss, tiled MLP, checkpoint offload, compiled blocks.

Each feature against the plain model with the same weights: the token losses and every gradient
(1e-6 relative in float32; compiled blocks 1e-5). The (cp, tp) cases are in tests/dist/test_memory_parity.py.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from megaring.model import IGNORE_INDEX, ModelConfig, ParallelContext, build_model, validate_model_config
from megaring.model.tiling import swiglu, tiled
from megaring.tensor_parallel.chunked_cross_entropy import chunked_lm_cross_entropy

TINY = ModelConfig()


def _batch(seq=24, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, seq), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[1, 5:17] = IGNORE_INDEX  # with chunks of 5: chunk [5, 10) of sample 1 holds only ignored labels
    return tokens, torch.arange(seq).expand(2, seq), labels


def _losses_and_grads(cfg, tokens, positions, labels, **build):
    model = build_model(cfg, ParallelContext.single(), seed=3, **build)
    losses = model(tokens, positions, labels=labels)
    (losses * torch.linspace(0.5, 1.5, losses.numel()).view(losses.shape)).sum().backward()  # uneven dloss
    return losses.detach(), {n: p.grad for n, p in model.named_parameters()}, model


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_same(got, want, rtol):
    assert _rel(got[0], want[0]) <= rtol, "token losses differ"
    for name, grad in want[1].items():
        assert _rel(got[1][name], grad) <= rtol, f"grad of {name} differs: {_rel(got[1][name], grad):.2e}"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("features", [dict(loss_chunk=5), dict(loss_chunk=1000), dict(mlp_chunk=7),
                                      dict(mlp_chunk=5, loss_chunk=7, activation_checkpointing=True)])
def test_features_match_the_plain_model(tie, features):
    batch = _batch()
    plain = dataclasses.replace(TINY, tie_embeddings=tie)
    want = _losses_and_grads(plain, *batch)
    got = _losses_and_grads(dataclasses.replace(plain, **features), *batch)
    _assert_same(got, want, 1e-6)
    assert (got[0][batch[2] == IGNORE_INDEX] == 0).all()


def test_logits_entry_is_unchanged_by_loss_chunk():
    tokens, positions, _ = _batch()
    plain = build_model(TINY, ParallelContext.single(), seed=3)(tokens, positions)
    chunked = build_model(dataclasses.replace(TINY, loss_chunk=4), ParallelContext.single(), seed=3)(tokens, positions)
    assert torch.equal(plain, chunked)


def test_chunked_loss_of_all_ignored_labels_is_zero_with_zero_grads():
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    labels = torch.full((1, 6), IGNORE_INDEX)
    losses = chunked_lm_cross_entropy(hidden, weight, labels, vocab_size=16, tp_axis=ParallelContext.single().tp,
                                      sequence_parallel=False, chunk=4)
    losses.sum().backward()
    assert (losses == 0).all() and (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_tiled_swiglu_equals_untiled_with_bias():
    g = torch.Generator().manual_seed(0)
    x, w13, b13, w2 = (torch.randn(*s, generator=g, requires_grad=True) for s in [(2, 11, 8), (12, 8), (12,), (8, 6)])
    grad_out = torch.randn(2, 11, 8, generator=g)
    want = swiglu(x, w13, b13, w2)
    want_grads = torch.autograd.grad(want, (x, w13, b13, w2), grad_out)
    got = tiled(swiglu, x, (w13, b13, w2), 4)
    got_grads = torch.autograd.grad(got, (x, w13, b13, w2), grad_out)
    assert _rel(got, want) <= 1e-6
    for g_got, g_want in zip(got_grads, want_grads):
        assert _rel(g_got, g_want) <= 1e-6


def test_checkpoint_offload_on_cpu_is_plain_checkpointing_and_says_so(caplog):
    batch = _batch()
    want = _losses_and_grads(dataclasses.replace(TINY, activation_checkpointing=True), *batch)
    with caplog.at_level(logging.INFO, logger="megaring.model.offload"):
        got = _losses_and_grads(dataclasses.replace(TINY, activation_checkpointing=True, checkpoint_offload=True),
                                *batch)
    _assert_same(got, want, 0.0)
    from megaring.model.offload import _say_cpu_once
    assert _say_cpu_once.cache_info().currsize == 1  # logged, once per process


def test_config_problems_of_the_memory_keys():
    cfg = dataclasses.replace(TINY, loss_chunk=-1, mlp_chunk=-2, checkpoint_offload=True)
    problems = "\n".join(validate_model_config(cfg))
    assert "model.loss_chunk=-1" in problems and "model.mlp_chunk=-2" in problems
    assert "model.checkpoint_offload=true" in problems and "activation_checkpointing" in problems


def test_compiled_blocks_match_eager():
    """inductor on CPU, one block (a compile costs ~20 s on 2 cores)."""
    cfg = dataclasses.replace(TINY, n_layers=1)
    batch = _batch()
    want = _losses_and_grads(cfg, *batch)
    got = _losses_and_grads(dataclasses.replace(cfg, compile=True), *batch)
    assert not got[2].block_runner.failed
    _assert_same(got, want, 1e-5)


def test_a_compile_failure_falls_back_to_eager_with_one_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    batch = _batch()
    want = _losses_and_grads(TINY, *batch)
    with pytest.warns(RuntimeWarning, match="model.compile") as record:
        got = _losses_and_grads(dataclasses.replace(TINY, compile=True), *batch, compile_backend=broken_backend)
    assert len([w for w in record if "model.compile" in str(w.message)]) == 1
    assert got[2].block_runner.failed
    _assert_same(got, want, 0.0)
