"""What ``megaring-eval`` leaves in its run directory: ``eval.jsonl``, ``eval.png`` and a printed table.

Records (one JSON object per line of ``eval.jsonl``):

- ``{"task": "passkey" | "needle", "length": L, "depth": d, "score": s, "cases": n}``
- ``{"task": "position_loss", "start": a, "end": b, "loss": x, "tokens": n}``
- ``{"task": "loss", "loss": x, "ppl": p, "tokens": n}`` (the whole held-out split, with position_loss)
- ``{"task": "run", "seconds": s, "world_size": w, "peak_mem_gib": m}`` (m: the largest rank's peak)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

EVAL_FILE, PLOT_FILE = "eval.jsonl", "eval.png"


def position_records(metrics: dict) -> list[dict]:
    """``eval/position_loss/<a>-<b>`` metrics as records, and the overall loss."""
    out = [{"task": "loss", "loss": metrics["eval_loss"], "ppl": metrics["eval_ppl"], "tokens": metrics["eval_tokens"]}]
    for key, loss in metrics.items():
        if key.startswith("eval/position_loss/"):
            span = key.rsplit("/", 1)[1]
            a, b = (int(x) for x in span.split("-"))
            out.append({"task": "position_loss", "start": a, "end": b, "loss": loss,
                        "tokens": metrics[f"eval/position_tokens/{span}"]})
    return out


def write_records(run_dir: Path, records: list[dict]) -> Path:
    """``eval.jsonl``, replaced atomically (a re-run of the same command writes the same records)."""
    path = run_dir / EVAL_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return path


def table(records: list[dict]) -> str:
    """The records as text: a length x depth grid per retrieval task, the loss per position bucket."""
    lines = []
    for task in ("passkey", "needle"):
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        depths = sorted({r["depth"] for r in rows})
        lengths = sorted({r["length"] for r in rows})
        score = {(r["length"], r["depth"]): r["score"] for r in rows}
        lines.append(f"{task} (score: fraction of the answer's tokens predicted; rows: length, columns: depth)")
        lines.append(f"{'length':>9} " + " ".join(f"{d:>6g}" for d in depths) + "    mean")
        for length in lengths:
            cells = [score.get((length, d)) for d in depths]
            known = [c for c in cells if c is not None]
            lines.append(f"{length:>9} " + " ".join(f"{c:6.3f}" if c is not None else "     -" for c in cells)
                         + f"  {sum(known) / max(len(known), 1):6.3f}")
    buckets = [r for r in records if r["task"] == "position_loss"]
    if buckets:
        lines.append("position_loss (mean next-token loss by position)")
        for r in buckets:
            loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
            lines.append(f"  {r['start']:>9}-{r['end']:<9} {loss:>9}  ({r['tokens']:,} tokens)")
    for r in (r for r in records if r["task"] == "loss"):
        lines.append(f"loss {r['loss']:.4f}, ppl {r['ppl']:.4g} ({r['tokens']:,} tokens)")
    return "\n".join(lines)


def plot(run_dir: Path, records: list[dict]) -> Path | None:
    """``eval.png``: one heatmap per retrieval task (length x depth, score as colour) and the
    position-loss curve; None when there is nothing to draw or matplotlib (the ``plots`` extra) is missing."""
    tasks = [t for t in ("passkey", "needle") if any(r["task"] == t for r in records)]
    buckets = [r for r in records if r["task"] == "position_loss" and r["loss"] is not None]
    panels = len(tasks) + bool(buckets)
    if not panels:
        return None
    try:
        import matplotlib
    except ImportError:  # the "plots" extra
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in records if r["task"] == task]
        depths, lengths = sorted({r["depth"] for r in rows}), sorted({r["length"] for r in rows})
        score = {(r["length"], r["depth"]): r["score"] for r in rows}
        grid = [[score.get((length, d), math.nan) for length in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{length:,}" for length in lengths], rotation=45, ha="right")
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth of the key")
        ax.set_title(f"{task}: score")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    if buckets:
        ax = axes[0][-1]
        ax.plot([max(r["end"], 1) for r in buckets], [r["loss"] for r in buckets], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token position (bucket end)")
        ax.set_ylabel("mean next-token loss")
        ax.set_title("loss by position")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
