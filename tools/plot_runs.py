"""Plot loss curves and a scaling chart from megaring run directories.

    python -m tools.plot_runs multirun/2026-11-26/17-00-00 --out plots/
    python -m tools.plot_runs runs/a runs/b --x world_size

Each argument is a run directory (it holds ``metrics.jsonl`` and Hydra's ``.hydra/config.yaml``)
or a directory above run directories (a Hydra multirun sweep), searched recursively. Writes
``loss.png`` (loss against step, one line per run) and ``scaling.png`` (median tokens/s and
peak memory per rank against cp or world size; the first logged step is left out of the median
as warm-up). Prints the table behind the chart and writes it to ``runs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import yaml  # noqa: E402  (PyYAML comes with Hydra / OmegaConf)


@dataclass
class Run:
    path: Path
    dp: int
    cp: int
    tp: int
    metrics: list[dict]  # the training steps' records (eval and loss-spike records left out)
    zero_stage: int = 1
    ulysses: int = 1

    @property
    def label(self) -> str:
        return f"dp{self.dp} cp{self.cp} tp{self.tp} zero{self.zero_stage}" + (
            f" ulysses{self.ulysses}" if self.ulysses > 1 else "")

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    def median(self, key: str) -> float | None:
        values = [m[key] for m in self.metrics[1:] or self.metrics if m.get(key) is not None]
        return statistics.median(values) if values else None


def find_runs(paths: list[str]) -> list[Run]:
    """Every run directory at or below ``paths``, sorted by (world size, cp, tp)."""
    runs = []
    for root in map(Path, paths):
        if not root.exists():
            raise SystemExit(f"no such run directory: {root}")
        for metrics_file in sorted([root / "metrics.jsonl"] if (root / "metrics.jsonl").exists()
                                   else root.rglob("metrics.jsonl")):
            runs.append(load_run(metrics_file.parent))
    if not runs:
        raise SystemExit(f"no metrics.jsonl under {', '.join(paths)}")
    return sorted(runs, key=lambda r: (r.world_size, r.cp, r.tp, str(r.path)))


def load_run(path: Path) -> Run:
    with open(path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    metrics = [m for m in records if m.get("loss") is not None]
    parallel = {}
    config_file = path / ".hydra" / "config.yaml"
    if config_file.exists():
        parallel = (yaml.safe_load(config_file.read_text()) or {}).get("parallel", {})
    return Run(path, int(parallel.get("dp", 1)), int(parallel.get("cp", 1)), int(parallel.get("tp", 1)), metrics,
               int(parallel.get("zero_stage", 1)), int(parallel.get("ulysses", 1)))


def plot_loss(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        steps = [m["step"] for m in run.metrics]
        ax.plot(steps, [m["loss"] for m in run.metrics], marker="." if len(steps) < 30 else None,
                label=f"{run.label} ({run.path.name})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = out / "loss.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def plot_scaling(runs: list[Run], out: Path, x: str) -> Path:
    fig, (ax_tps, ax_mem) = plt.subplots(1, 2, figsize=(10, 4.2))
    xs = [getattr(run, x) for run in runs]
    tps = [run.median("tokens_per_s") for run in runs]
    mem = [run.median("peak_mem_gib") for run in runs]
    for ax, ys, ylabel in ((ax_tps, tps, "tokens/s (median)"), (ax_mem, mem, "peak memory per rank (GiB)")):
        ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o")
        for xi, yi, run in zip(xs, ys, runs):
            if yi is not None:
                ax.annotate(run.label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted(set(xs)))
        ax.grid(alpha=0.3)
    fig.suptitle(f"scaling against {x}")
    fig.tight_layout()
    target = out / "scaling.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def summarize(run: Run) -> dict:
    """One row of the table: layout, steps, final loss, median tokens/s and peak memory per rank."""
    return {"path": str(run.path), "layout": run.label, "dp": run.dp, "cp": run.cp, "tp": run.tp,
            "zero_stage": run.zero_stage, "ulysses": run.ulysses, "world_size": run.world_size,
            "steps": len(run.metrics), "final_loss": run.metrics[-1]["loss"] if run.metrics else None,
            "tokens_per_s": run.median("tokens_per_s"), "peak_mem_gib": run.median("peak_mem_gib")}


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories or sweep directories above them")
    p.add_argument("--out", default="plots", help="directory for loss.png and scaling.png")
    p.add_argument("--x", default="cp", choices=("cp", "world_size", "dp", "tp", "zero_stage", "ulysses"),
                   help="x axis of the scaling chart")
    args = p.parse_args(argv)
    runs = find_runs(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = [summarize(run) for run in runs]
    root = Path(os.path.commonpath([str(run.path) for run in runs])) if len(runs) > 1 else runs[0].path.parent
    names = [str(run.path.relative_to(root)) or run.path.name for run in runs]  # whole names, not truncated
    width = max(len(n) for n in names + ["run"])
    print(f"{'run':<{width}} {'layout':<28} {'steps':>5} {'final loss':>10} {'tokens/s':>10} {'peak GiB':>9}")
    for name, row in zip(names, table):
        print(f"{name:<{width}} {row['layout']:<28} {row['steps']:>5} {row['final_loss'] or float('nan'):>10.4f} "
              f"{row['tokens_per_s'] or float('nan'):>10.1f} {row['peak_mem_gib'] or float('nan'):>9.3f}")
    (out / "runs.json").write_text(json.dumps(table, indent=1) + "\n")
    written = [plot_loss(runs, out), plot_scaling(runs, out, args.x)]
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
