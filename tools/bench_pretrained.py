"""Benchmark loading a Hugging Face checkpoint into megaring at tp=1 and tp=2, and exporting one.

    python -m tools.bench_pretrained make --out /tmp/llama1b               # random Llama-3.2-1B shapes
    python -m tools.bench_pretrained load --ckpt /tmp/llama1b --rounds 2    # megaring tp=1, tp=2 vs transformers
    python -m tools.bench_pretrained zero3 --ckpt /tmp/llama1b --rounds 2   # ZeRO-3 dp=2: partitioned as loaded
    python -m tools.bench_pretrained export --ckpt /tmp/llama1b --layers 4  # from a (1,1,2,ZeRO-3) checkpoint
        [--baseline <another megaring tree> --rounds 2]                      # its export side by side

``load`` runs, in turn and in fresh processes, transformers' ``from_pretrained`` (one process) and
megaring's sharded load at tp=1 and tp=2 (gloo processes, each reading only its slices), reads every
loaded weight once (so that memory-mapped weights count), and reports per rank the wall time, the
peak resident memory (ru_maxrss) and the safetensors bytes read; the summary is the median over
rounds. ``zero3`` loads at ZeRO-3, dp=2, tp=1 in bf16, as the trainer does (``build_weights``):
``after`` builds the model partitioned (``partitioned_construction``) and each rank reads only the
rows of its partitions; ``before`` is the earlier way, the whole tp shard loaded (here straight in
bf16; the trainer built it in float32 first) and then partitioned. ``export`` trains one step at
``optim.lr=0`` at dp=1, cp=1, tp=2 with ZeRO-3 to get a checkpoint, then times ``megaring-export``
of it in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make(args) -> None:
    """A random checkpoint with Llama-3.2-1B's shapes (bf16, as the real one ships)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.tie_weights()  # to_empty gave lm_head storage of its own
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(args.out, max_shard_size="2GB")
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _anon_gib() -> float:
    """Anonymous resident memory now (the weights held), without the memory-mapped file pages read."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 2**20


def _hf_worker(ckpt: str) -> dict:
    import torch
    import transformers

    began = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    _touch(model)
    return {"wall_s": time.perf_counter() - began, "peak_rss_gib": _peak_rss_gib(), "anon_gib": _anon_gib()}


def _touch(model) -> None:
    """Read every weight once: memory-mapped weights count in RSS only once their pages are read."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def _megaring_worker(rank: int, world: int, port: int, ckpt: str, results) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from megaring.distributed import ParallelDims, build_mesh
    from megaring.hf import hf_model_config, load_hf_weights
    from megaring.model import ParallelContext, Transformer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    ctx = ParallelContext.from_mesh(build_mesh(ParallelDims(tp=world)))
    began = time.perf_counter()
    cfg = hf_model_config(ckpt)
    torch.set_default_dtype(torch.bfloat16)  # the shards are allocated in the checkpoint's dtype
    model = Transformer(cfg, ctx)
    report = load_hf_weights(model, ctx, ckpt)
    _touch(model)
    results.put((rank, {"wall_s": time.perf_counter() - began, "peak_rss_gib": _peak_rss_gib(),
                        "anon_gib": _anon_gib(), "bytes_read_gib": report.bytes_read / 2**30}))
    dist.barrier()
    dist.destroy_process_group()


def _zero3_worker(rank: int, world: int, port: int, ckpt: str, mode: str, results) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from megaring.distributed import build_mesh
    from megaring.distributed.deepspeed_mpu import DeepSpeedMPU
    from megaring.engine.deepspeed_engine import (
        _deepspeed,
        deepspeed_config,
        partitioned_construction,
    )
    from megaring.hf import load_hf_weights
    from megaring.model import ParallelContext, Transformer
    from tests.helpers.train_cfg import compose_cfg

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    cfg = compose_cfg("data=mock", "data.vocab_size=128256", f"model.init_from={ckpt}", f"parallel.dp={world}",
                      "parallel.zero_stage=3", "trainer.dtype=bfloat16", "trainer.seq_len=64",
                      f"trainer.global_batch_size={world}", "logging.wandb.mode=disabled")
    mesh = build_mesh(cfg.parallel.dims())
    ctx = ParallelContext.from_mesh(mesh)
    began = time.perf_counter()
    if mode == "before":
        torch.set_default_dtype(torch.bfloat16)
        model = Transformer(cfg.model, ctx)
        report = load_hf_weights(model, ctx, ckpt)
        mpu = DeepSpeedMPU(mesh)  # the removed path: partition the whole model after building it
        _deepspeed().zero.Init(module=model, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                               config_dict_or_path=deepspeed_config(cfg, torch.bfloat16), mpu=mpu)
    else:
        with partitioned_construction(cfg, mesh, torch.device("cpu")) as writer:
            model = Transformer(cfg.model, ctx)
        report = load_hf_weights(model, ctx, ckpt, writer)
    stored = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    results.put((rank, {"wall_s": time.perf_counter() - began, "peak_rss_gib": _peak_rss_gib(),
                        "anon_gib": _anon_gib(), "bytes_read_gib": report.bytes_read / 2**30,
                        "stored_gib": stored / 2**30, "largest_held_gib": report.largest_held / 2**30}))
    dist.barrier()
    dist.destroy_process_group()


def _run_megaring(ckpt: str, tp: int, worker=_megaring_worker, *extra) -> list[dict]:
    import torch.multiprocessing as mp

    from tests.helpers.pool import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, tp, port, ckpt, *extra, results)) for r in range(tp)]
    for p in procs:
        p.start()
    out = {}
    while len(out) < len(procs):
        try:
            out.update([results.get(timeout=5)])
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"a worker failed: exit codes {[p.exitcode for p in procs]}") from None
    for p in procs:
        p.join()
    return [out[r] for r in range(tp)]


def zero3(args) -> None:
    rounds = []
    for i in range(args.rounds):
        rnd = {mode: _run_megaring(args.ckpt, 2, _zero3_worker, mode) for mode in ("before", "after")}
        rounds.append(rnd)
        print(f"round {i + 1}: {json.dumps(rnd)}", flush=True)
    print(f"\ncheckpoint {args.ckpt}, ZeRO-3, dp=2, tp=1, bf16; max over ranks, median of {args.rounds} round(s)")
    print("| load | wall (s) | peak RSS per rank (GiB) | anonymous memory after (GiB) | parameters stored (GiB) "
          "| largest rows held (GiB) | bytes read per rank (GiB) |\n|---|---|---|---|---|---|---|")
    keys = ("wall_s", "peak_rss_gib", "anon_gib", "stored_gib", "largest_held_gib", "bytes_read_gib")
    for mode in ("before", "after"):
        cells = [statistics.median(max(y[k] for y in r[mode]) for r in rounds) for k in keys]
        print(f"| {mode} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def _run_hf(ckpt: str) -> dict:
    code = f"import json, tools.bench_pretrained as b; print(json.dumps(b._hf_worker({ckpt!r})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load(args) -> None:
    rounds = []
    for i in range(args.rounds):
        rnd = {"transformers": _run_hf(args.ckpt), "tp1": _run_megaring(args.ckpt, 1),
               "tp2": _run_megaring(args.ckpt, 2)}
        rounds.append(rnd)
        print(f"round {i + 1}: {json.dumps(rnd)}", flush=True)
    size = sum(p.stat().st_size for p in Path(args.ckpt).glob("*.safetensors")) / 2**30
    print(f"\ncheckpoint {args.ckpt}: {size:.2f} GiB of safetensors; median of {args.rounds} round(s)")
    print("| loader | wall (s) | peak RSS per rank (GiB) | anonymous memory after (GiB) | bytes read per rank (GiB) |"
          "\n|---|---|---|---|---|")
    hf = [r["transformers"] for r in rounds]
    print(f"| transformers from_pretrained, 1 process | {statistics.median(h['wall_s'] for h in hf):.1f} | "
          f"{statistics.median(h['peak_rss_gib'] for h in hf):.2f} | "
          f"{statistics.median(h['anon_gib'] for h in hf):.2f} | (whole files) |")
    for key in ("tp1", "tp2"):
        wall = statistics.median(max(y["wall_s"] for y in r[key]) for r in rounds)
        print(f"| megaring {key.replace('tp', 'tp=')} (max over ranks) | {wall:.1f} | "
              f"{statistics.median(max(y['peak_rss_gib'] for y in r[key]) for r in rounds):.2f} | "
              f"{statistics.median(max(y['anon_gib'] for y in r[key]) for r in rounds):.2f} | "
              f"{statistics.median(max(y['bytes_read_gib'] for y in r[key]) for r in rounds):.2f} |")


def export(args) -> None:
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.tmp))
    ckpt = Path(args.ckpt)
    if args.layers and not args.run:  # a shallower copy of the checkpoint's config, same per-layer shapes
        small = work / "hf"
        code = (f"import tools.bench_pretrained as b, argparse; "
                f"b.make(argparse.Namespace(out={str(small)!r}, layers={args.layers}))")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        ckpt = small
    run = Path(args.run) if args.run else work / "run"
    train = [sys.executable, "-m", "megaring.train", f"model.init_from={ckpt}", "data=mock", "data.vocab_size=128256",
             "trainer.seq_len=64", "trainer.global_batch_size=1", "trainer.max_steps=1", "optim.lr=0",
             "parallel.tp=2", "parallel.zero_stage=3", "parallel.nproc_per_node=2", "logging.wandb.mode=disabled",
             "logging.progress_bar=false", f"hydra.run.dir={run}"]
    if not args.run:
        print("$", " ".join(train), flush=True)
        subprocess.run(train, cwd=ROOT, check=True)
    trees = {"this tree": ROOT, **({f"baseline {args.baseline}": Path(args.baseline)} if args.baseline else {})}
    results = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():  # alternating, each in a fresh process
            results[name].append(_export_once(tree, run, work / "exported"))
    size = sum(p.stat().st_size for p in (work / "exported").glob("*.safetensors")) / 2**30
    print(f"exported {size:.2f} GiB of safetensors (float32, the training dtype on CPU); "
          f"median of {args.rounds} round(s)\n| code | wall (s) | peak RSS (GiB) |\n|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r['wall_s'] for r in rows):.1f} | "
              f"{statistics.median(r['peak_rss_gib'] for r in rows):.2f} |")
    shutil.rmtree(work)


def _export_once(tree: Path, run: Path, out: Path) -> dict:
    """``megaring-export`` of ``run`` with the megaring code in ``tree``, in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)  # the previous round's export, inside this tool's own temporary dir
    code = ("import json, resource, time; from megaring.cli.export import main; t = time.perf_counter(); "
            f"main(['input={run}', 'output={out}']); print(json.dumps({{'wall_s': time.perf_counter() - t, "
            "'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--layers", type=int, default=16)
    ld = sub.add_parser("load")
    ld.add_argument("--ckpt", required=True)
    ld.add_argument("--rounds", type=int, default=2)
    z3 = sub.add_parser("zero3")
    z3.add_argument("--ckpt", required=True)
    z3.add_argument("--rounds", type=int, default=2)
    ex = sub.add_parser("export")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--layers", type=int, default=0, help="export a shallower model of the same shapes (memory)")
    ex.add_argument("--tmp", default=None)
    ex.add_argument("--rounds", type=int, default=1)
    ex.add_argument("--run", default=None, help="export this run directory instead of training one")
    ex.add_argument("--baseline", default=None, help="another megaring tree whose export to time side by side")
    args = p.parse_args(argv)
    {"make": make, "load": load, "zero3": zero3, "export": export}[args.cmd](args)


if __name__ == "__main__":
    main()
