"""`make demo`: preprocess the embedded default corpus, train `tiny` on it with ring attention, plot.

The corpus is the source code of the running interpreter's standard library, grouped into long
"repository" documents (no download). Training runs two local processes (dp=1, cp=2, tp=1): each
holds half of every 2048-token sample in the zigzag layout and K/V travel around the ring.
Every stage is the command a user would type; they are printed before they run.

    python -m tools.demo [--steps 60] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from megaring.outdir import OwnOutput, clear_own

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# What a training run directory holds; an earlier demo run is replaced, nothing else (megaring.outdir).
RUN_OUTPUT = OwnOutput("a megaring training run", markers=(".hydra",),
                       entries=(".hydra", "*.log", "metrics.jsonl", "megaring.lock", "wandb*", "checkpoints",
                                "profile", "hang", "hang_report.json", "verify"))


def run(cmd: list[str], **kwargs) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def preprocess(data_dir: Path, vocab: int, max_mb: int) -> None:
    if (data_dir / "metadata.json").exists():
        print(f"\ncorpus already preprocessed: {data_dir}")
        return
    run([str(BIN / "megaring-preprocess"), "input=stdlib", f"output={data_dir}", "workers=2",
         f"tokenizer.vocab_size={vocab}", f"max_bytes={max_mb * 2**20}"])


def train(data_dir: Path, run_dir: Path, args) -> None:
    if run_dir.exists():  # the same command would resume the finished run; the demo trains afresh
        print(f"\nremoving the previous demo run {run_dir}")
        clear_own(run_dir, RUN_OUTPUT)  # refuses a directory holding anything a run does not write
    run([str(BIN / "megaring-train"), "model=tiny", f"model.vocab_size={args.vocab}", "model.dim=128",
         "model.n_layers=4", "data=files", f"data.path={data_dir}", "parallel.cp=2", "parallel.nproc_per_node=2",
         f"trainer.seq_len={args.seq_len}", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
         f"trainer.max_steps={args.steps}", "trainer.checkpoint_every=30", "optim.lr=3e-3",
         "optim.warmup_steps=5", f"hydra.run.dir={run_dir}"],
        env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})


def summary(run, plots: list[Path], data_dir: Path, seconds: float) -> None:
    """``run``: the training run as :func:`plot_runs.load_run` reads it."""
    run_dir, metrics = run.path, run.metrics
    first, last = metrics[0], metrics[-1]
    n = min(5, len(metrics))
    head, tail = (sum(m["loss"] for m in part) / n for part in (metrics[:n], metrics[-n:]))
    tps = run.median("tokens_per_s")  # the first step is warm-up
    wandb_runs = sorted(str(p) for p in run_dir.rglob("offline-run-*"))
    print("\n" + "=" * 72)
    print(f"megaring demo finished in {seconds:.0f} s")
    print(f"  loss          {head:.3f} over steps {first['step']}-{metrics[n - 1]['step']} -> {tail:.3f} over steps "
          f"{metrics[-n]['step']}-{last['step']} (final step {last['loss']:.3f})")
    print(f"  tokens/s      {tps:,.0f} (median, 2 ranks, cp=2 ring attention)")
    print(f"  data          {data_dir}")
    print(f"  run dir       {run_dir} (metrics.jsonl, train.log, checkpoints/)")
    print(f"  wandb offline {wandb_runs[0] if wandb_runs else 'none'}")
    for p in plots:
        if p.name == "loss.png":  # the scaling chart needs several runs to say anything
            print(f"  loss plot     {p}")
    print("=" * 72)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where data, the run and plots go")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--corpus-mb", type=int, default=8, help="how much of the standard library to use")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = (ROOT / args.out).resolve()
    data_dir, run_dir = out / "data", out / "train"
    preprocess(data_dir, args.vocab, args.corpus_mb)
    train(data_dir, run_dir, args)
    from tools import plot_runs

    print(f"\n$ python -m tools.plot_runs {run_dir} --out {out / 'plots'}")
    plots = plot_runs.main([str(run_dir), "--out", str(out / "plots")])
    summary(plot_runs.load_run(run_dir), plots, data_dir, time.perf_counter() - start)


if __name__ == "__main__":
    main()
