"""The planner's memory model (``megaring.plan``) against measured peaks of real training steps.

Every point is a real ``megaring-train`` run (self-spawned gloo workers, ``data=mock``: packed
documents of mean length 2048, float32, ZeRO-1, one step) whose peak resident memory per rank
(rank 0's ``peak_mem_gib``) is compared with ``megaring.plan.estimate`` for the same layout:

- **measured step memory** = peak at the length - peak of the same model and layout at 512 tokens
  per rank, features off (the base run: interpreter, torch, DeepSpeed, model states, data pipeline,
  and a 512-token step; measured once per (model, cp, tp), since the planner does not model a host);
- **predicted step memory** = ``saved + transient`` of the estimate at the point minus the same of
  the estimate of the base run (its ``states`` cancel), so both sides are the same difference;
- error = predicted / measured - 1. One step is enough: DeepSpeed's ZeRO optimizer creates Adam's
  states at initialisation, so they are in the base. ``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors leave.

    python -m tools.bench_plan --json /tmp/bench_plan.json --plot docs/img/plan_predicted_vs_measured.png
    python -m tools.bench_plan --longest 125m     # the longest sequence per layout on this host (no runs)

Measurements already in ``--json`` are not run again; the predictions are always recomputed, so
rerunning the command after a change to the memory model re-scores the stored measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from megaring.plan import Hardware, Layout, estimate, longest_seq_len
from tools.bench_layouts import peak_memory, train
from tools.bench_model import load_config

# "small": a 4-layer model with a Llama-2-sized vocabulary, so that the logits matter as they do in 125m+.
SMALL = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 768, "vocab_size": 32000}
CHUNKS = {"loss_chunk": 2048, "mlp_chunk": 2048}

# (model, cp, tp, global seq_len, features): "off", "chunks" (loss + MLP), "chunks+ac" (and checkpointing)
POINTS = (
    ("tiny", 1, 1, 32768, "off"), ("tiny", 1, 1, 131072, "off"), ("tiny", 1, 1, 131072, "chunks+ac"),
    ("tiny", 1, 2, 65536, "off"), ("tiny", 2, 1, 65536, "off"), ("tiny", 2, 2, 131072, "chunks"),
    ("tiny", 4, 1, 131072, "off"),
    ("small", 1, 1, 8192, "off"), ("small", 1, 1, 8192, "chunks"), ("small", 1, 1, 16384, "chunks+ac"),
    ("small", 2, 2, 16384, "off"), ("small", 2, 1, 16384, "chunks"),
)
BASE_LEN = 512


def model_args(model: str, features: str) -> tuple[list[str], dict]:
    """(megaring-train overrides, ModelConfig fields) of a point."""
    fields = dict(SMALL) if model == "small" else {}
    if features.startswith("chunks"):
        fields |= CHUNKS
    if features.endswith("+ac"):
        fields["activation_checkpointing"] = True
    overrides = ["model=tiny"] + [f"model.{k}={str(v).lower()}" for k, v in fields.items()]
    return overrides, fields


def predicted(model: str, cp: int, tp: int, seq_len: int, features: str):
    _, fields = model_args(model, features)
    cfg = dataclasses.replace(load_config("tiny"), **fields)
    lay = Layout(1, cp, tp, 1, tp > 1, cfg.activation_checkpointing, cfg.loss_chunk, cfg.mlp_chunk)
    return estimate(cfg, seq_len, 1, lay, Hardware(dtype_bytes=4))


def with_prediction(r: dict) -> dict:
    """The predicted step memory above the base run, as measured: estimate(point) - estimate(base run)."""
    est = predicted(r["model"], r["cp"], r["tp"], r["seq_len"], r["features"])
    base = predicted(r["model"], r["cp"], r["tp"], BASE_LEN * r["cp"], "off")
    step, base_step = est.saved + est.transient, base.saved + base.transient
    return r | {"predicted_gib": (step - base_step) / 2**30, "saved_gib": est.saved / 2**30,
                "transient_gib": est.transient / 2**30, "base_step_gib": base_step / 2**30}


def run_point(out: Path, model: str, cp: int, tp: int, seq_len: int, features: str, steps: int) -> float:
    overrides, _ = model_args(model, features)
    extra = [*overrides, f"parallel.sequence_parallel={str(tp > 1).lower()}"]
    name = f"{model}_cp{cp}_tp{tp}_{seq_len}_{features}"
    run = train(out / name, 1, cp, tp, seq_len, steps, 1, [a for a in extra if a != "model=tiny"])
    return peak_memory(run)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_plan_runs"))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--only", type=int, nargs="*", help="indices into the point list")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--longest", default=None, help="a configs/model name: print the longest sequences instead")
    p.add_argument("--memory-gib", type=float, default=23.5, help="with --longest: the host's memory")
    p.add_argument("--reserved-gib", type=float, default=0.45, help="with --longest: per process, not for the step")
    args = p.parse_args(argv)
    if args.longest:
        print(longest_table(args.longest, args.memory_gib, args.reserved_gib))
        return []
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    points = [POINTS[i] for i in args.only] if args.only else list(POINTS)
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {(r["model"], r["cp"], r["tp"], r["seq_len"], r["features"]) for r in rows}
    bases: dict[tuple, float] = {(r["model"], r["cp"], r["tp"]): r["base_gib"] for r in rows}
    for pt in points:
        model, cp, tp, seq_len, features = pt
        if pt in done:
            continue
        try:
            if (model, cp, tp) not in bases:
                bases[model, cp, tp] = run_point(args.out, model, cp, tp, BASE_LEN * cp, "off", args.steps)
            peak = run_point(args.out, model, cp, tp, seq_len, features, args.steps)
        except Exception as e:  # keep going: one failed point must not lose the others
            print(f"failed: {pt}: {e}", flush=True)
            continue
        base = bases[model, cp, tp]
        rows.append({"model": model, "cp": cp, "tp": tp, "seq_len": seq_len, "features": features,
                     "peak_gib": peak, "base_gib": base, "measured_gib": peak - base})
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows[-1]), flush=True)
    rows = [with_prediction(r) for r in rows]  # the current memory model, also for stored measurements
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return rows


def longest_table(model: str, memory_gib: float, reserved_gib: float) -> str:
    """Longest sequence per (cp, memory per rank) and features, from megaring.plan.longest_seq_len."""
    cfg = load_config(model)
    feats = {"off": {}, "checkpointing": {"activation_checkpointing": True},
             "all on": {"activation_checkpointing": True, **CHUNKS}}
    out = ["| cp | memory per rank | " + " | ".join(feats) + " |", "|---|---|" + "---|" * len(feats)]
    for cp, per_rank in ((1, memory_gib), (4, memory_gib / 4), (4, memory_gib)):
        hw = Hardware(memory_bytes=per_rank * 2**30, dtype_bytes=4, reserved_bytes=reserved_gib * 2**30)
        cells = [f"{longest_seq_len(cfg, Layout(cp=cp, **kw), hw):,}" for kw in feats.values()]
        out.append(f"| {cp} | {per_rank:.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| model | cp | tp | seq_len | features | peak per rank | base (512 tokens) | measured step | "
           "predicted step | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r["predicted_gib"] / r["measured_gib"] - 1
        out.append(f"| {r['model']} | {r['cp']} | {r['tp']} | {r['seq_len']:,} | {r['features']} | "
                   f"{r['peak_gib']:.3f} GiB | {r['base_gib']:.3f} | {r['measured_gib']:.3f} | "
                   f"{r['predicted_gib']:.3f} | {err:+.0%} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for model, marker in (("tiny", "o"), ("small", "s")):
        mine = [r for r in rows if r["model"] == model]
        ax.scatter([r["measured_gib"] for r in mine], [r["predicted_gib"] for r in mine], marker=marker, label=model)
        for r in mine:
            ax.annotate(f"cp{r['cp']}tp{r['tp']} {r['seq_len'] // 1024}K {r['features']}",
                        (r["measured_gib"], r["predicted_gib"]), fontsize=6, alpha=0.7)
    lo = min(min(r["measured_gib"], r["predicted_gib"]) for r in rows) * 0.8
    hi = max(max(r["measured_gib"], r["predicted_gib"]) for r in rows) * 1.25
    xs = [lo, hi]
    ax.plot(xs, xs, "k-", lw=0.8, label="predicted = measured")
    ax.fill_between(xs, [x * 0.9 for x in xs], [x * 1.1 for x in xs], color="grey", alpha=0.2, label="±10%")
    ax.set(xscale="log", yscale="log", xlabel="measured step memory per rank (GiB)",
           ylabel="predicted step memory per rank (GiB)", title="megaring.plan: predicted vs measured")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
