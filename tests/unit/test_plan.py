"""The memory model on configurations counted by hand, and the planner's answers."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from megaring.cli.plan import main
from megaring.model import ModelConfig, num_params
from megaring.plan import Hardware, Layout, describe, estimate, longest_seq_len, plan, state_bytes
from tests.helpers.cli import clean_env

TINY = ModelConfig()  # vocab 256, dim 64, 2 layers, 8 heads (4 kv), ffn 192: 107,712 parameters


def test_states_by_zero_stage():
    p = num_params(TINY)
    assert p == 2 * (64 * 128 + 64 * 64 + 3 * 64 * 192) + 5 * 64 + 2 * 256 * 64
    # float32: weights 4 + grads 4 + Adam 8 bytes per parameter, divided over dp*cp = 4 from stage 1, 2, 3
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=0), 4) == p * 16
    # ZeRO 1-2 keep an fp32 copy of their partition even in float32 (DeepSpeed clones it)
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=1), 4) == p * (8 + 12 / 4)
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=2), 4) == p * (4 + 16 / 4)
    assert state_bytes(TINY, Layout(dp=2, cp=2, zero_stage=3), 4) == p * 16 / 4
    # bfloat16 adds a float32 master copy; tp=2 halves everything
    assert state_bytes(TINY, Layout(tp=2, zero_stage=0), 2) == p / 2 * (2 + 2 + 12)


def test_checkpointed_activations():
    hw = Hardware(dtype_bytes=4)
    # 1024 tokens over cp=2: 512 per rank; checkpoints keep one (512, 64) float32 input per layer, and
    # outside the layers the final norm (float32 input, normalised rows, output: 3 x 64 x 4 bytes + 1 / rms),
    # the rope tables (2 x head_dim 8 x 4), the batch (4 int64) and the float32 losses
    e = estimate(TINY, 1024, 1, Layout(cp=2, activation_checkpointing=True), hw)
    outside = (3 * 64 * 4 + 4) + 2 * 8 * 4 + 4 * 8 + 8
    assert e.saved == 512 * (2 * 64 * 4 + outside)


def test_the_logits_of_one_chunk():
    hw = Hardware(dtype_bytes=4)
    big_vocab = dataclasses.replace(TINY, vocab_size=32000)
    # float32 logits + the shifted exp (softmax): 8 bytes per logit, whole or one chunk of 100 tokens
    whole = estimate(big_vocab, 1024, 1, Layout(cp=2), hw)
    chunked = estimate(big_vocab, 1024, 1, Layout(cp=2, loss_chunk=100), hw)
    assert whole.transient == 512 * 32000 * 8
    assert chunked.transient == 100 * 32000 * 8
    # bfloat16 logits get a float32 copy before the shifted exp: 2 + 4 + 4 bytes; tp halves the vocabulary
    bf16 = estimate(big_vocab, 1024, 1, Layout(tp=2), Hardware(dtype_bytes=2))
    assert bf16.transient == 1024 * 16000 * 10


def test_tiled_mlp_keeps_no_intermediates():
    hw = Hardware(dtype_bytes=4)
    plain = estimate(TINY, 4096, 1, Layout(), hw)
    tiled = estimate(TINY, 4096, 1, Layout(mlp_chunk=1024), hw)
    # w13 output (2 F), silu, product: 4 x 192 floats per token and layer, none kept when tiled
    assert plain.saved - tiled.saved == 2 * 4096 * 4 * 192 * 4


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


def test_cli_refuses_unknown_keys_and_bad_values_naming_the_key(capsys):
    assert main(["devicez=4", "seq_len=1048576", "devices=0", "trainer.seq_len=1M", "memory_gb=nan"]) == 2
    err = capsys.readouterr().err
    for line in ("  - devicez is not a megaring-plan key: did you mean devices=?",
                 "  - seq_len is not a megaring-plan key: did you mean trainer.seq_len=?",
                 "  - devices=0 must be >= 1", "  - trainer.seq_len='1M' must be an integer >= 1",
                 "  - memory_gb=nan must be > 0"):
        assert line in err, err
    assert err.count("\n  - ") == 5


def test_cli_lists_the_models_and_names_an_unsupported_architecture(tmp_path, capsys):
    assert main(["model=gpt2"]) == 2
    err = capsys.readouterr().err
    assert "model=gpt2 is not a model of configs/model: use one of ['125m', '1b', '7b', 'llama3_8b', 'tiny']" in err
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}')
    assert main([f"model.init_from={tmp_path}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()  # one line: the architecture, not GPT-2's missing Llama keys
    assert line.startswith(f"megaring-plan: model.init_from={tmp_path}: ")
    assert "'GPT2LMHeadModel'] is not supported" in line


def test_plan_cli_process_exits_2_on_an_unknown_key():
    proc = subprocess.run([sys.executable, "-m", "megaring.cli.plan", "model=tiny", "devicez=4"], env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "devicez is not a megaring-plan key: did you mean devices=?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_longest_seq_len_is_the_last_length_that_fits():
    hw = Hardware(memory_bytes=2**30, dtype_bytes=4, reserved_bytes=2**28)
    lay = Layout(cp=2)
    n = longest_seq_len(TINY, lay, hw)
    assert n > 0 and n % (1024 * 4) == 0
    budget = hw.memory_bytes - hw.reserved_bytes
    assert estimate(TINY, n, 1, lay, hw).peak <= budget < estimate(TINY, n + 4096, 1, lay, hw).peak


def saved_bytes(cfg: ModelConfig, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves in one forward of the real model (weights excluded)."""
    import torch

    from megaring.model import ParallelContext, build_model

    model = build_model(cfg, ParallelContext.single(), seed=0).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(seq_len)[None], labels=tokens.roll(-1, 1))
    return sum(n for ptr, n in seen.items() if ptr not in weights)


def test_saved_activations_are_the_tensors_the_model_saves():
    """Every term of ``saved`` names a tensor the model keeps: the estimate matches what autograd saves
    (the batch's four int64 rows, of which autograd sees two, are the only difference)."""
    hw = Hardware(dtype_bytes=4)
    for fields in ({"loss_chunk": 100}, {"loss_chunk": 100, "mlp_chunk": 100}):
        cfg = dataclasses.replace(TINY, **fields)
        lay = Layout(loss_chunk=cfg.loss_chunk, mlp_chunk=cfg.mlp_chunk)
        counted, predicted = saved_bytes(cfg, 512), estimate(cfg, 512, 1, lay, hw).saved
        assert 0 <= predicted - counted <= 512 * 4 * 8, (fields, counted, predicted)


def test_the_activation_peak_meets_only_the_gradients_made_by_then():
    hw = Hardware(dtype_bytes=4)
    layer = (num_params(TINY) - 2 * 256 * 64 - 64) / 2  # one layer's parameters
    long = estimate(TINY, 4096, 1, Layout(), hw)
    assert long.live_grads == (256 * 64 + layer + 64) * 4  # the output layer, the final norm, the last layer
    assert long.peak == long.states - long.grads + long.live_grads + long.saved + long.transient
    short = estimate(TINY, 2, 1, Layout(), hw)  # next to no activations: the optimizer step with every gradient
    assert short.peak == short.states and short.step == short.grads
