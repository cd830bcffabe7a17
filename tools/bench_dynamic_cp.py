"""Step time of a short-sequence stage on a mesh sized for long ones: fixed cp against ``parallel.dynamic_cp``.

``megaring-train`` with 4 local workers at cp=4 (dp=1, float32, ZeRO-1, mock data) on samples of
``--seq-len`` tokens, twice per round in turn: the plain run (every sample split over the 4-rank
ring) and ``parallel.dynamic_cp=true parallel.dynamic_cp_tokens=<seq-len>`` (cp' = 1: each rank
takes whole samples of its own, no ring). Reports per run the median ``step_time_s`` over the
steps after the first two, ``kv_bytes_sent_max`` and ``effective_cp``, and the median over rounds
of the ratio dynamic / fixed.

    python -m tools.bench_dynamic_cp --seq-len 2048 --steps 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.rounds import median_ratio


def run(run_dir: Path, args, dynamic: bool) -> dict:
    """One 4-worker run; the medians of its steps after the first two."""
    overrides = [f"model={args.model}", "data=mock", f"trainer.seq_len={args.seq_len}",
                 f"trainer.global_batch_size={args.global_batch}", "trainer.micro_batch_size=1",
                 f"trainer.max_steps={args.steps}", "parallel.cp=4", "parallel.nproc_per_node=4",
                 "parallel.zero_stage=1", "logging.wandb.mode=disabled", "logging.progress_bar=false",
                 f"hydra.run.dir={run_dir}"]
    if dynamic:
        overrides += ["parallel.dynamic_cp=true", f"parallel.dynamic_cp_tokens={args.seq_len}"]
    subprocess.run([sys.executable, "-m", "megaring.train", *overrides], check=True, capture_output=True)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "step_time_s" in m][2:]
    return {"step_time_s": statistics.median(m["step_time_s"] for m in steps),
            "kv_bytes_sent_max": steps[-1]["kv_bytes_sent_max"], "effective_cp": steps[-1]["effective_cp"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            fixed = run(Path(tmp) / f"fixed{r}", args, dynamic=False)
            dynamic = run(Path(tmp) / f"dynamic{r}", args, dynamic=True)
            pairs.append((dynamic["step_time_s"], fixed["step_time_s"]))
            for name, m in (("fixed cp=4", fixed), ("dynamic_cp", dynamic)):
                print(f"| {r + 1} | {name} | {m['effective_cp']} | {m['step_time_s'] * 1e3:.1f} | "
                      f"{m['kv_bytes_sent_max'] / 2**20:.2f} |", flush=True)
    print(f"dynamic / fixed step time, median over {args.rounds} rounds: {median_ratio(pairs):.3f}")


if __name__ == "__main__":
    main()
