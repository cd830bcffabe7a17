"""Training-step throughput of the megaring model against Hugging Face ``LlamaForCausalLM``.

Single process, CPU, float32. For each (model size, sequence length) both models get identical
shapes and identical weights (megaring's init, mapped with ``megaring.hf.names``), and the same
batch; their steps (forward + backward + AdamW) alternate, so both see the same machine load.
Reports median tokens/s (wall clock), the speed-up as the median over back-to-back step pairs of
the wall-clock and of the process-CPU-time ratios, the logits agreement of the first step and
model TFLOP/s from ``model_flops_per_token``.

    .venv/bin/python -m tools.bench_model --models tiny 125m --seq-lens 2048 1024 --steps 5
    .venv/bin/python -m tools.bench_model --models tiny --seq-lens 2048 --compile   # model.compile=true

With ``--compile`` the megaring model runs with ``model.compile=true`` (each block through
``torch.compile``; the compilation happens in the warm-up steps, which are not timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from omegaconf import OmegaConf

from megaring.config_dir import CONFIG_DIR
from megaring.hf.names import hf_llama_config_kwargs, to_hf_llama_state_dict
from megaring.model import (
    IGNORE_INDEX,
    ModelConfig,
    ParallelContext,
    build_model,
    count_valid_tokens,
    gather_full_state_dict,
    local_loss,
    model_flops_per_token,
    num_params,
    vocab_parallel_cross_entropy,
)
from tools.rounds import median_ratio


def load_config(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(f"{CONFIG_DIR}/model/{name}.yaml")))


def build_pair(cfg: ModelConfig, seq_len: int):
    import transformers

    ctx = ParallelContext.single()
    ours = build_model(cfg, ctx, seed=0)
    hf_cfg = transformers.LlamaConfig(**hf_llama_config_kwargs(cfg, max_position_embeddings=seq_len))
    hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    hf.load_state_dict(to_hf_llama_state_dict(gather_full_state_dict(ours, ctx), cfg), strict=True)
    return ours.train(), hf.train()


def make_batch(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return dict(tokens=tokens, labels=labels, positions=torch.arange(seq_len).expand(batch, seq_len))


def ours_step(model, opt, b):
    logits = model(b["tokens"], b["positions"])  # (B, S, V)
    loss = local_loss(vocab_parallel_cross_entropy(logits, b["labels"], model.ctx.tp), count_valid_tokens(b["labels"]))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return logits.detach()


def hf_step(model, opt, b):
    out = model(input_ids=b["tokens"], labels=b["tokens"])  # HF shifts the labels itself
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.logits.detach()


def timed(fn, *args) -> tuple[tuple[float, float], torch.Tensor]:
    """(wall seconds, process CPU seconds) of ``fn(*args)``, and its result. On a shared machine the
    CPU time is the steadier measure: it does not count the time other processes hold the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def bench_one(name: str, seq_len: int, batch: int, steps: int, warmup: int, compile: bool = False) -> dict:
    cfg = dataclasses.replace(load_config(name), compile=compile)
    ours, hf = build_pair(cfg, seq_len)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True) for m in (ours, hf)]
    b = make_batch(cfg, batch, seq_len)
    times = {"ours": [], "hf": []}
    logits_err = None
    for step in range(warmup + steps):
        # Alternate which model goes first, so neither always runs on the other's cache leftovers.
        if step % 2:
            t_hf, l_hf = timed(hf_step, hf, opts[1], b)
            t_ours, l_ours = timed(ours_step, ours, opts[0], b)
        else:
            t_ours, l_ours = timed(ours_step, ours, opts[0], b)
            t_hf, l_hf = timed(hf_step, hf, opts[1], b)
        if step == 0:
            logits_err = ((l_ours - l_hf).norm() / l_hf.norm()).item()
        if step >= warmup:
            times["ours"].append(t_ours)
            times["hf"].append(t_hf)
    tokens = batch * seq_len
    tps = {k: tokens / statistics.median(t[0] for t in v) for k, v in times.items()}
    # Each pair of steps ran back to back, so their ratio is robust to slow drifts in machine load.
    pairs = list(zip(times["ours"], times["hf"]))
    wall = median_ratio((hf[0], ours[0]) for ours, hf in pairs)
    cpu = median_ratio((hf[1], ours[1]) for ours, hf in pairs)
    flops = model_flops_per_token(cfg, seq_len)
    return dict(model=name, params=num_params(cfg), seq_len=seq_len, batch=batch, ours=tps["ours"], hf=tps["hf"],
                wall=wall, cpu=cpu, tflops=tps["ours"] * flops / 1e12, logits_err=logits_err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "125m"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="megaring with model.compile=true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}, "
          f"median of {args.steps} steps after {args.warmup} warm-up, model.compile={str(args.compile).lower()}")
    print("| model | params | tokens/sample | megaring tok/s | HF sdpa tok/s | speed-up, wall | speed-up, CPU time "
          "| megaring model TFLOP/s | logits rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for seq_len in args.seq_lens:
            r = bench_one(name, seq_len, args.batch, args.steps, args.warmup, args.compile)
            print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['seq_len']} | {r['ours']:.0f} | {r['hf']:.0f} "
                  f"| {r['wall']:.2f}x | {r['cpu']:.2f}x | {r['tflops']:.3f} | {r['logits_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
