"""Tiny random Hugging Face checkpoints for the import/export tests (needs ``transformers``).

Each maker saves a randomly initialised ``*ForCausalLM`` with ``save_pretrained`` and returns
the directory. Weights are perturbed so that norms and biases are not their trivial init values.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _save(model, directory: Path, seed: int, **save_kwargs) -> Path:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory, **save_kwargs)
    return directory


def llama_dir(directory: Path, *, vocab: int = 101, tie: bool = False, rope: dict | None = None,
              seed: int = 0, **save_kwargs) -> Path:
    """GQA (4 heads, 2 kv heads), hidden 32, 2 layers, odd vocabulary, llama3 RoPE scaling by default."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, **(LLAMA3_ROPE if rope is None else rope)},
        bos_token_id=1, eos_token_id=2)
    return _save(transformers.LlamaForCausalLM(cfg), directory, seed, **save_kwargs)


def qwen2_dir(directory: Path, *, vocab: int = 150, seed: int = 1, **save_kwargs) -> Path:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
    return _save(transformers.Qwen2ForCausalLM(cfg), directory, seed, **save_kwargs)


def mistral_dir(directory: Path, *, vocab: int = 120, sliding_window: int | None = None, seed: int = 2) -> Path:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=sliding_window, rms_norm_eps=1e-5)
    return _save(transformers.MistralForCausalLM(cfg), directory, seed)


def hf_loss_and_logits(directory: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own loss (next-token, mean) and logits for ``tokens`` (float32, eager attention)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=tokens, labels=tokens)
    return out.loss, out.logits


def transformers_token_losses(directory: Path, cfg):
    """transformers' float64 next-token losses on the first eval batch of ``cfg`` (one process),
    each packed document run on its own: yields ``(losses, positions)`` per document."""
    import transformers

    from megaring.data import RankShard, build_eval_reader

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager")
    reader = build_eval_reader(cfg.data, cfg.trainer.batch_shape(), RankShard())
    with torch.no_grad():
        for mb in reader.micro_batches(0):
            for row in range(mb["tokens"].shape[0]):
                seg = mb["segment_ids"][row]
                for s in seg.unique():
                    keep = seg == s
                    pos = mb["positions"][row][keep]
                    logits = model(input_ids=mb["tokens"][row][keep][None], position_ids=pos[None]).logits[0]
                    yield torch.nn.functional.cross_entropy(logits.double(), mb["labels"][row][keep],
                                                            reduction="none"), pos
