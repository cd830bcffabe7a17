"""The planner's memory model (``megaring.plan``) against the measured memory of real training steps.

Every point is a real ``megaring-train`` run (self-spawned gloo workers, ``data=mock``: packed
documents of mean length 2048, float32, ZeRO-1, one step). The comparison is made inside the run,
per rank (rank 0's ``metrics.jsonl``):

- **measured** = ``step_mem_gib`` of step 1: the high-water mark of resident memory during the step
  (batch, forward, backward, optimizer step) minus resident memory just before it
  (``megaring.train.metrics.StepMemory``). What was resident before (interpreter, torch, DeepSpeed,
  the weights and ZeRO's fp32 copy, the data pipeline) is not the step's. Adam's moments are created
  at step 1's optimizer step (torch's Adam is lazy), after the activations are freed.
- **predicted** = ``Estimate.step`` of ``megaring.plan.estimate`` for the same layout: the
  activations, the working memory, and the weight gradients that exist at that moment (the one part
  of the states a step allocates and that does not exist before it).
- error = predicted / measured - 1. ``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors leave the
  resident set, so resident memory follows the live tensors.

    python -m tools.bench_plan --json docs/img/plan_points.json --plot docs/img/plan_predicted_vs_measured.png
    python -m tools.bench_plan --longest 125m     # the longest sequence per layout on this host (no runs)
    python -m tools.bench_plan --longest 125m --memory-gib 21 --confirm --json docs/img/longest_125m.json
        # and one real step at each predicted longest length, features off and all on, cp=1 and cp=4

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
from tools.bench_layouts import train
from tools.bench_model import load_config

# "small": a 4-layer model with a Llama-2-sized vocabulary, so that the logits matter as they do in 125m+.
SMALL = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 768, "vocab_size": 32000}
CHUNKS = {"loss_chunk": 2048, "mlp_chunk": 2048}

# (model, global seq_len, cp, tp, features): "off", "chunks" (loss + MLP), "chunks+ac" (and checkpointing).
# Sequence parallelism whenever tp > 1. Ordered cheapest first (one tiny cp=1 step at 131K takes minutes).
POINTS = (
    ("tiny", 65536, 2, 1, "off"), ("tiny", 131072, 4, 1, "off"), ("tiny", 131072, 4, 1, "chunks"),
    ("tiny", 131072, 2, 2, "chunks"), ("tiny", 32768, 1, 1, "off"), ("tiny", 32768, 1, 2, "off"),
    ("tiny", 65536, 1, 1, "chunks+ac"), ("tiny", 131072, 4, 1, "chunks+ac"),
    ("small", 16384, 2, 1, "chunks"), ("small", 8192, 1, 1, "off"), ("small", 8192, 1, 1, "chunks"),
    ("small", 8192, 1, 1, "chunks+ac"), ("small", 8192, 1, 2, "off"), ("small", 16384, 2, 2, "off"),
    ("small", 16384, 4, 1, "chunks+ac"), ("tiny", 131072, 1, 1, "chunks+ac"),
)


def model_args(model: str, features: str) -> tuple[list[str], dict]:
    """(megaring-train overrides, ModelConfig fields) of a point."""
    fields = dict(SMALL) if model == "small" else {}
    if features.startswith("chunks"):
        fields |= CHUNKS
    if features.endswith("+ac"):
        fields["activation_checkpointing"] = True
    overrides = ["model=tiny"] + [f"model.{k}={str(v).lower()}" for k, v in fields.items()]
    return overrides, fields


def with_prediction(r: dict) -> dict:
    """The step's predicted memory per rank: ``Estimate.step`` (saved + transient + the gradients that
    exist by the activation peak, or all gradients at the optimizer step if more)."""
    _, fields = model_args(r["model"], r["features"])
    cfg = dataclasses.replace(load_config("tiny"), **fields)
    tp = r["tp"]
    lay = Layout(1, r["cp"], tp, 1, tp > 1, cfg.activation_checkpointing, cfg.loss_chunk, cfg.mlp_chunk)
    est = estimate(cfg, r["seq_len"], 1, lay, Hardware(dtype_bytes=4))
    return r | {"predicted_gib": est.step / 2**30, "saved_gib": est.saved / 2**30,
                "transient_gib": est.transient / 2**30, "grads_gib": est.live_grads / 2**30}


def run_point(out: Path, model: str, seq_len: int, cp: int, tp: int, features: str) -> dict:
    """One training step of the point; rank 0's memory of step 1."""
    overrides, _ = model_args(model, features)
    extra = [*overrides, f"parallel.sequence_parallel={str(tp > 1).lower()}"]
    name = f"{model}_cp{cp}_tp{tp}_{seq_len}_{features}"
    first = train(out / name, 1, cp, tp, seq_len, 1, 1, [a for a in extra if a != "model=tiny"]).metrics[0]
    return {"model": model, "seq_len": seq_len, "cp": cp, "tp": tp, "features": features,
            "measured_gib": first["step_mem_gib"], "peak_gib": first["peak_mem_gib"],
            "step_time_s": first["step_time_s"]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_plan_runs"))
    p.add_argument("--only", type=int, nargs="*", help="indices into the point list")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--longest", default=None, help="a megaring/configs/model name: print the longest sequences instead")
    p.add_argument("--memory-gib", type=float, default=23.5, help="with --longest: the host's memory")
    p.add_argument("--reserved-gib", type=float, default=0.45, help="with --longest: per process, not for the step")
    p.add_argument("--confirm", action="store_true",
                   help="with --longest: train one real step at each predicted length (--only: indices of LONGEST)")
    args = p.parse_args(argv)
    if args.longest:
        print(longest_table(args.longest, args.memory_gib, args.reserved_gib))
        if not args.confirm:
            return []
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        rows = confirm_longest(args.longest, args.memory_gib, args.reserved_gib, args.out, args.json, args.only)
        print(longest_runs_table(rows))
        return rows
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    points = [POINTS[i] for i in args.only] if args.only else list(POINTS)
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {(r["model"], r["seq_len"], r["cp"], r["tp"], r["features"]) for r in rows}
    for pt in points:
        if pt in done:
            continue
        try:
            rows.append(run_point(args.out, *pt))
        except Exception as e:  # keep going: one failed point must not lose the others
            print(f"failed: {pt}: {e}", flush=True)
            continue
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows[-1]), flush=True)
    rows = [with_prediction(r) for r in rows]  # the current memory model, also for stored measurements
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return rows


FEATURES = {"off": {}, "checkpointing": {"activation_checkpointing": True},
            "all on": {"activation_checkpointing": True, **CHUNKS}}
# (cp, features) of the confirming runs: the ranks share the host, so each gets memory / cp.
LONGEST = ((1, "off"), (4, "off"), (4, "all on"), (1, "all on"))


def confirm_longest(model: str, memory_gib: float, reserved_gib: float, out: Path, json_path: Path | None,
                    only: list[int] | None) -> list[dict]:
    """One real ``megaring-train`` step (``data=mock``: packed documents) at each predicted longest
    length of :data:`LONGEST`. Rows already in ``json_path`` are not run again."""
    rows = json.loads(json_path.read_text()) if json_path and json_path.exists() else []
    for i, (cp, feat) in enumerate(LONGEST):
        if (only and i not in only) or any(r["cp"] == cp and r["features"] == feat for r in rows):
            continue
        hw = _host_share(memory_gib, reserved_gib, cp)
        n = longest_seq_len(load_config(model), Layout(cp=cp, **FEATURES[feat]), hw)
        extra = [f"model.{k}={str(v).lower()}" for k, v in FEATURES[feat].items()]
        try:
            if n == 0:
                raise ValueError("the planner fits no length in this memory")
            first = train(out / f"longest_{model}_cp{cp}_{feat.replace(' ', '_')}_{n}", 1, cp, 1, n, 1, 1, extra,
                          model=model).metrics[0]
        except Exception as e:  # an out-of-memory kill is a result too: keep it and go on
            print(f"failed: cp={cp} {feat} at {n}: {e}", flush=True)
            first = {}
        rows.append({"model": model, "cp": cp, "features": feat, "seq_len": n, "memory_gib": memory_gib,
                     "reserved_gib": reserved_gib, "measured_gib": first.get("peak_mem_gib"),
                     "step_mem_gib": first.get("step_mem_gib"), "step_time_s": first.get("step_time_s"),
                     "loss": first.get("loss")})
        print(json.dumps(rows[-1]), flush=True)
        if json_path:
            json_path.write_text(json.dumps(rows, indent=1))
    return rows


def _host_share(memory_gib: float, reserved_gib: float, cp: int) -> Hardware:
    """Each of the cp ranks' share of this host, float32."""
    return Hardware(memory_bytes=memory_gib / cp * 2**30, dtype_bytes=4, reserved_bytes=reserved_gib * 2**30)


def longest_runs_table(rows: list[dict]) -> str:
    """Measured = rank 0's process peak (``peak_mem_gib``) and the step's own (``step_mem_gib``); every
    rank of these layouts holds the same tokens, so the host holds about cp times rank 0's peak.
    Predicted = ``Estimate.peak`` plus the reserved memory, and ``Estimate.step``."""
    out = ["| cp | features | seq_len | peak per rank: predicted | measured | step: predicted | measured | "
           "all ranks | KiB per token (step) | step time | loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["cp"], list(FEATURES).index(r["features"]))):
        cp, n = r["cp"], r["seq_len"]
        hw = _host_share(r["memory_gib"], r["reserved_gib"], cp)
        est = estimate(load_config(r["model"]), n, 1, Layout(cp=cp, **FEATURES[r["features"]]), hw)
        cells = [f"{cp}", r["features"], f"{n:,}", f"{(est.peak + hw.reserved_bytes) / 2**30:.2f} GiB"]
        if r["measured_gib"] is None:
            out.append("| " + " | ".join(cells) + " | did not train | | | | | | |")
            continue
        cells += [f"{r['measured_gib']:.2f} GiB", f"{est.step / 2**30:.2f} GiB", f"{r['step_mem_gib']:.2f} GiB",
                  f"{r['measured_gib'] * cp:.1f} GiB", f"{r['step_mem_gib'] * 2**20 * cp / n:.0f}",
                  f"{r['step_time_s']:.0f} s", f"{r['loss']:.4f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def longest_table(model: str, memory_gib: float, reserved_gib: float) -> str:
    """Longest sequence per (cp, memory per rank) and features, from megaring.plan.longest_seq_len."""
    cfg = load_config(model)
    out = ["| cp | memory per rank | " + " | ".join(FEATURES) + " |", "|---|---|" + "---|" * len(FEATURES)]
    for cp, share in ((1, 1), (4, 4), (4, 1)):
        hw, per_rank = _host_share(memory_gib, reserved_gib, share), memory_gib / share
        cells = [f"{longest_seq_len(cfg, Layout(cp=cp, **kw), hw):,}" for kw in FEATURES.values()]
        out.append(f"| {cp} | {per_rank:.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| model | seq_len | cp | tp | features | measured step | predicted step | saved | transient | "
           "live grads | error | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r["predicted_gib"] / r["measured_gib"] - 1
        out.append(f"| {r['model']} | {r['seq_len']:,} | {r['cp']} | {r['tp']} | {r['features']} | "
                   f"{r['measured_gib']:.3f} GiB | {r['predicted_gib']:.3f} GiB | {r['saved_gib']:.3f} | "
                   f"{r['transient_gib']:.3f} | {r['grads_gib']:.3f} | {err:+.1%} | {r['peak_gib']:.3f} GiB |")
    inside = sum(abs(r["predicted_gib"] / r["measured_gib"] - 1) <= 0.10 for r in rows)
    return "\n".join(out) + f"\n\nwithin 10%: {inside} of {len(rows)}"


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
    ax.set(xscale="log", yscale="log", xlabel="measured step memory per rank, rank 0 (GiB)",
           ylabel="predicted step memory per rank (GiB)", title="megaring.plan: predicted vs measured")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
