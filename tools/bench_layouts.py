"""Whole training steps of ``megaring-train`` at several layouts: throughput, and memory against length.

Every measurement is a real ``megaring-train`` run (self-spawned workers, gloo on CPU, wandb off),
printed before it starts; the figures come from its ``metrics.jsonl``.

    python -m tools.bench_layouts throughput --seq-len 4096 --steps 8
        tokens/s (median over the steps after the first) and peak memory per rank for (dp, cp, tp)
        in (1,1,1), (1,2,1), (2,1,1), (1,1,2) at the same global batch.
    python -m tools.bench_layouts memory --cp 1 4 --seq-lens 8192 16384 32768
        peak memory per rank against the global sequence length at each cp, a linear fit
        ``peak = a + b * seq_len`` per cp, and from it the longest sequence that fits this machine's
        memory (all cp ranks on this host) and one device of that memory per rank.

``--model`` picks a megaring/configs/model name (default tiny); trailing arguments are more ``megaring-train``
overrides, e.g. ``model.activation_checkpointing=true``.

Peak memory is rank 0's: peak resident set size on CPU (torch, DeepSpeed and the interpreter
included), peak allocated memory on CUDA. Results are also written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from tools.plot_runs import Run, load_run  # the same reading of a run directory as the plots

ROOT = Path(__file__).resolve().parent.parent

LAYOUTS = ((1, 1, 1), (1, 2, 1), (2, 1, 1), (1, 1, 2))


def train(run_dir: Path, dp: int, cp: int, tp: int, seq_len: int, steps: int, global_batch: int,
          extra: list[str], model: str = "tiny") -> Run:
    """One ``megaring-train`` run, read back as the plot tool reads runs."""
    cmd = [sys.executable, "-m", "megaring.train", f"model={model}", "data=mock", f"parallel.dp={dp}",
           f"parallel.cp={cp}", f"parallel.tp={tp}", "parallel.nproc_per_node=auto", f"trainer.seq_len={seq_len}",
           f"trainer.global_batch_size={global_batch}", "trainer.micro_batch_size=1", f"trainer.max_steps={steps}",
           "trainer.checkpoint_every=0", "trainer.resume=false", "logging.wandb.mode=disabled",
           "logging.progress_bar=false", "parallel.timeout_s=3600", *extra, f"hydra.run.dir={run_dir}"]
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return load_run(run_dir)


def peak_memory(run: Run) -> float:
    return max(m["peak_mem_gib"] for m in run.metrics)


def throughput(args) -> list[dict]:
    rows = []
    for dp, cp, tp in LAYOUTS:
        run = train(args.out / f"tput_dp{dp}_cp{cp}_tp{tp}", dp, cp, tp, args.seq_len, args.steps,
                    args.global_batch, args.extra, model=args.model)
        rows.append({"dp": dp, "cp": cp, "tp": tp, "seq_len": args.seq_len, "steps": len(run.metrics),
                     "tokens_per_s": run.median("tokens_per_s"), "step_time_s": run.median("step_time_s"),
                     "peak_mem_gib": peak_memory(run)})
    base = rows[0]["tokens_per_s"]
    print("\n| (dp, cp, tp) | processes | tokens/s (median) | vs (1,1,1) | step time | peak memory per rank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| ({r['dp']}, {r['cp']}, {r['tp']}) | {r['dp'] * r['cp'] * r['tp']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {r['step_time_s']:.2f} s | {r['peak_mem_gib']:.3f} GiB |")
    return rows


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def machine_memory_gib() -> float:
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return total_kib / 2**20


def memory(args) -> dict:
    budget = args.budget_gib or machine_memory_gib()
    points, fits = [], {}
    for cp in args.cp:
        for seq_len in args.seq_lens:
            run = train(args.out / f"mem_cp{cp}_seq{seq_len}", 1, cp, 1, seq_len, args.steps, 1, args.extra,
                        model=args.model)
            points.append({"cp": cp, "seq_len": seq_len, "peak_mem_gib": peak_memory(run),
                           "step_mem_gib": max(m.get("step_mem_gib") or 0.0 for m in run.metrics),
                           "step_time_s": run.metrics[-1]["step_time_s"]})
        mine = [p for p in points if p["cp"] == cp]
        if len(mine) < 2:
            continue  # one length: a measurement, no fit
        a, b = linear_fit([p["seq_len"] for p in mine], [p["peak_mem_gib"] for p in mine])
        fits[cp] = {"a_gib": a, "b_kib_per_token": b * 2**20,
                    "max_seq_len_this_host": int((budget / cp - a) / b),  # cp ranks share the host's memory
                    "max_seq_len_device_per_rank": int((budget - a) / b)}  # each rank has `budget` to itself
    print("\n| cp | global seq_len | peak memory per rank | of which the step's | step time |")
    print("|---|---|---|---|---|")
    for p in points:
        print(f"| {p['cp']} | {p['seq_len']:,} | {p['peak_mem_gib']:.3f} GiB | {p['step_mem_gib']:.3f} GiB | "
              f"{p['step_time_s']:.1f} s |")
    print(f"\nfit per rank: peak = a + b * seq_len; budget {budget:.1f} GiB")
    print("| cp | a (GiB) | b (KiB/token of the global sequence) | longest seq_len, all ranks on this host | "
          "longest seq_len, one such device per rank |")
    print("|---|---|---|---|---|")
    for cp, f in fits.items():
        print(f"| {cp} | {f['a_gib']:.3f} | {f['b_kib_per_token']:.2f} | {f['max_seq_len_this_host']:,} | "
              f"{f['max_seq_len_device_per_rank']:,} |")
    return {"budget_gib": budget, "points": points, "fits": fits}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput", help="tokens/s and peak memory per rank at four layouts")
    t.add_argument("--seq-len", type=int, default=4096)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--global-batch", type=int, default=2, help="samples per step (divisible by dp)")
    m = sub.add_parser("memory", help="peak memory against sequence length at several cp")
    m.add_argument("--cp", type=int, nargs="+", default=[1, 4])
    m.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    m.add_argument("--steps", type=int, default=1)
    m.add_argument("--budget-gib", type=float, default=None, help="memory to fit into (default: this machine's)")
    for sp in (t, m):
        sp.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_layouts")
        sp.add_argument("--model", default="tiny", help="a megaring/configs/model name")
        sp.add_argument("--json", type=Path, default=None)
        sp.add_argument("extra", nargs="*", help="more megaring-train overrides")
    args = p.parse_args(argv)
    result = throughput(args) if args.what == "throughput" else memory(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
