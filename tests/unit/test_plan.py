"""The memory model on configurations counted by hand, and the planner's answers."""

from __future__ import annotations

import dataclasses

from megaring.model import ModelConfig, num_params
from megaring.plan import Hardware, Layout, describe, estimate, plan, state_bytes
from megaring.plan.cli import main

TINY = ModelConfig()  # vocab 256, dim 64, 2 layers, 8 heads (4 kv), ffn 192: 107,712 parameters


def test_states_by_zero_stage():
    p = num_params(TINY)
    assert p == 2 * (64 * 128 + 64 * 64 + 3 * 64 * 192) + 5 * 64 + 2 * 256 * 64
    # float32: weights 4 + grads 4 + Adam 8 bytes per parameter, divided over dp*cp = 4 from stage 1, 2, 3
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=0), 4) == p * 16
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=1), 4) == p * (8 + 8 / 4)
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=2), 4) == p * (4 + 12 / 4)
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=3), 4) == p * 16 / 4
    # bfloat16 adds a float32 master copy; tp=2 halves everything
    assert state_bytes(TINY, Layout(tp=2, zero_stage=0), 2) == p / 2 * (2 + 2 + 12)


def test_checkpointed_activations_and_the_loss_chunk():
    hw = Hardware(dtype_bytes=4)
    # 1024 tokens over cp=2: 512 per rank; checkpoints keep one (512, 64) input per layer
    e = estimate(TINY, 1024, 1, Layout(cp=2, activation_checkpointing=True), hw)
    assert e.saved == 2 * 512 * 64 * 4
    whole = estimate(TINY, 1024, 1, Layout(cp=2, activation_checkpointing=True), hw)
    chunked = estimate(TINY, 1024, 1, Layout(cp=2, activation_checkpointing=True, loss_chunk=100), hw)
    assert whole.transient - chunked.transient == (512 - 100) * 256 * (4 + 8)  # logits, softmax, gradient


def test_tiled_mlp_keeps_one_tile_of_intermediates():
    hw = Hardware(dtype_bytes=4)
    plain = estimate(TINY, 4096, 1, Layout(), hw)
    tiled = estimate(TINY, 4096, 1, Layout(mlp_chunk=1024), hw)
    assert plain.saved - tiled.saved == 2 * 4096 * 4 * 192 * 4 * (1 - 1024 / 4096)


def test_planner_orders_fitting_layouts_and_names_the_memory_a_misfit_needs():
    hw = Hardware(memory_bytes=2**30, dtype_bytes=4)
    p = plan(TINY, 1024, 1, 4, hw)
    assert p.fits and all(e.peak <= hw.memory_bytes for e in p.fits)
    assert [e.step_s for e in p.fits] == sorted(e.step_s for e in p.fits)
    big = dataclasses.replace(TINY, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, n_layers=32, vocab_size=128256)
    tiny_hw = Hardware(memory_bytes=2**30)
    nowhere = plan(big, 1 << 20, 1, 2, tiny_hw)
    assert not nowhere.fits
    text = describe(nowhere, tiny_hw)
    assert "fits nowhere" in text and f"needs {int(-(-nowhere.smallest.peak // 2**30))} GiB" in text


def test_cli(capsys):
    assert main(["model=tiny", "trainer.seq_len=1024", "devices=4", "memory_gb=1", "top=2"]) == 0
    assert "best first" in capsys.readouterr().out
    assert main(["model=7b", "trainer.seq_len=1048576", "devices=1", "memory_gb=24"]) == 1
    assert "fits nowhere" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
