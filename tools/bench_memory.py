"""Peak memory per token of one training step: megaring's memory features against Hugging Face + checkpointing.

Each configuration runs in a fresh process (``python -m tools.bench_memory --one NAME ...``, spawned
by the driver), float32, batch 1, cp = tp = 1, torch's default threads. The process builds the model,
runs one warm-up step at 1024 tokens (kernels, allocator), drops the gradients, then measures one
forward + loss + backward at ``--seq-len`` tokens:

- **peak**: the high-water mark of resident memory during the step (``VmHWM`` reset through
  ``/proc/self/clear_refs`` just before it) minus resident memory before it (model weights, batch and
  interpreter excluded; the weight gradients the step allocates, 4 bytes per parameter, included).
  ``MALLOC_MMAP_THRESHOLD_=65536`` makes every large tensor its own mapping, unmapped when freed,
  so resident memory follows the live tensors.
- **step time**: wall clock and process CPU time of that one step (one sample: noisy on a shared host).

A watchdog ends a configuration whose resident memory passes ``--cap-gib`` (the host is shared)
and records it as "over the cap". Configurations (``--configs``)::

    off          every feature off
    loss_chunk   model.loss_chunk=<--chunk>
    mlp_chunk    model.mlp_chunk=<--chunk>
    ac           model.activation_checkpointing=true
    ac_offload   + model.checkpoint_offload=true (a no-op on CPU: it logs so once)
    all          activation checkpointing + loss_chunk + mlp_chunk
    chunks       loss_chunk + mlp_chunk (no checkpointing)
    hf_ckpt      transformers LlamaForCausalLM (sdpa) with gradient_checkpointing_enable()
    hf           transformers LlamaForCausalLM (sdpa), no checkpointing

    python -m tools.bench_memory --model 125m --seq-len 16384 --json /tmp/bench_memory_16k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("off", "loss_chunk", "mlp_chunk", "ac", "all", "hf_ckpt")
ALL_CONFIGS = (*CONFIGS, "ac_offload", "hf", "chunks")
OVER_CAP = 3  # exit status of a configuration the watchdog ended


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _watchdog(cap_kib: int) -> None:
    """End this process (exit OVER_CAP) as soon as its resident memory passes the cap."""
    def watch():
        while True:
            if _status_kib("VmRSS") > cap_kib:
                print(f"over the cap: VmRSS > {cap_kib / 2**20:.1f} GiB", flush=True)
                os._exit(OVER_CAP)
            time.sleep(0.02)
    threading.Thread(target=watch, daemon=True).start()


def model_overrides(name: str, chunk: int) -> dict:
    return {"off": {}, "loss_chunk": {"loss_chunk": chunk}, "mlp_chunk": {"mlp_chunk": chunk},
            "ac": {"activation_checkpointing": True},
            "ac_offload": {"activation_checkpointing": True, "checkpoint_offload": True},
            "all": {"activation_checkpointing": True, "loss_chunk": chunk, "mlp_chunk": chunk},
            "chunks": {"loss_chunk": chunk, "mlp_chunk": chunk}}.get(name, {})


def load_model_config(model: str):
    """A megaring/configs/model name, or "small" (tools.bench_plan's 4-layer model with a 32000 vocabulary)."""
    from tools.bench_model import load_config
    from tools.bench_plan import SMALL

    return dataclasses.replace(load_config("tiny"), **SMALL) if model == "small" else load_config(model)


def build(name: str, model: str, chunk: int):
    """(model, step(batch) -> loss) for one configuration."""
    from megaring.model import ParallelContext, build_model, count_valid_tokens, local_loss

    cfg = dataclasses.replace(load_model_config(model), **model_overrides(name, chunk))
    if not name.startswith("hf"):
        ours = build_model(cfg, ParallelContext.single(), seed=0).train()

        def step(b):
            losses = ours(b["tokens"], b["positions"], labels=b["labels"])  # (B, S) float32 token losses
            loss = local_loss(losses, count_valid_tokens(b["labels"]))
            loss.backward()
            return loss
        return ours, step
    import transformers

    from megaring.hf.names import hf_llama_config_kwargs
    hf_cfg = transformers.LlamaConfig(**hf_llama_config_kwargs(cfg, max_position_embeddings=1 << 20), use_cache=False)
    hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32).train()
    if name == "hf_ckpt":
        hf.gradient_checkpointing_enable()  # transformers' default kwargs

    def hf_step(b):
        loss = hf(input_ids=b["tokens"], labels=b["tokens"]).loss  # HF shifts the labels itself
        loss.backward()
        return loss
    return hf, hf_step


def run_one(args) -> dict:
    from tools.bench_model import make_batch

    _watchdog(int(args.cap_gib * 2**20))
    model, step = build(args.one, args.model, args.chunk)
    cfg = load_model_config(args.model)
    step(make_batch(cfg, 1, 1024))  # warm-up: kernels, thread pools, allocator
    for p in model.parameters():
        p.grad = None
    batch = make_batch(cfg, 1, args.seq_len)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (_status_kib("VmHWM") - before) * 1024
    return {"config": args.one, "model": args.model, "seq_len": args.seq_len, "chunk": args.chunk,
            "peak_bytes": peak, "bytes_per_token": peak / args.seq_len, "step_wall_s": wall, "step_cpu_s": cpu,
            "loss": loss.item(), "threads": torch.get_num_threads(), "predicted_bytes": predicted_bytes(args)}


def predicted_bytes(args) -> float:
    """megaring.plan's ``Estimate.step`` for this configuration (cp = tp = 1, float32): what the measured
    step allocates over the resident weights; HF: none."""
    from megaring.plan import Hardware, Layout, estimate

    if args.one.startswith("hf"):
        return float("nan")
    cfg = dataclasses.replace(load_model_config(args.model), **model_overrides(args.one, args.chunk))
    lay = Layout(activation_checkpointing=cfg.activation_checkpointing, loss_chunk=cfg.loss_chunk,
                 mlp_chunk=cfg.mlp_chunk)
    e = estimate(cfg, args.seq_len, 1, lay, Hardware(dtype_bytes=4))
    return e.step


def spawn(name: str, args) -> dict:
    cmd = [sys.executable, "-m", "tools.bench_memory", "--one", name, "--model", args.model,
           "--seq-len", str(args.seq_len), "--chunk", str(args.chunk), "--cap-gib", str(args.cap_gib)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode == OVER_CAP:
        return {"config": name, "seq_len": args.seq_len, "error": f"over the {args.cap_gib} GiB cap"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"config": name, "seq_len": args.seq_len, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def _predicted(r: dict) -> str:
    pred = r.get("predicted_bytes", float("nan"))
    if pred != pred:  # NaN: HF, or a result from before the column existed
        return "-"
    return f"{pred / 2**30:.2f} GiB ({pred / r['peak_bytes'] - 1:+.0%})"


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["config"] == "hf_ckpt" and "error" not in r), None)
    out = ["| config | tokens | peak over baseline | bytes/token | vs HF+ckpt | step wall | vs HF+ckpt | step CPU "
           "| megaring.plan predicts |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['config']} | {r['seq_len']:,} | {r['error']} | | | | | | |")
            continue
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "-"
        t = f"{r['step_wall_s'] / ref['step_wall_s']:.2f}x" if ref else "-"
        out.append(f"| {r['config']} | {r['seq_len']:,} | {r['peak_bytes'] / 2**30:.2f} GiB | "
                   f"{r['bytes_per_token'] / 1024:.0f} KiB | {mem} | {r['step_wall_s']:.0f} s | {t} | "
                   f"{r['step_cpu_s']:.0f} s | {_predicted(r)} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="125m")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=2048, help="loss_chunk and mlp_chunk tokens")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=ALL_CONFIGS)
    p.add_argument("--cap-gib", type=float, default=18.0, help="end a configuration above this resident memory")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", choices=ALL_CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for name in args.configs:
        rows.append(spawn(name, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
