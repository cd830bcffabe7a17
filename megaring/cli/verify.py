"""``megaring-verify``: does this layout compute what one process computes? A few steps of both.

Takes the same config and overrides as ``megaring-train`` and shrinks the model and batch while
keeping what decides the numerics: the mesh (dp, cp, tp, ZeRO stage, sequence parallelism, shard
layout), the attention kernel, the ring backward schedule and the precision. It trains
:data:`STEPS` steps at that layout (self-spawned workers, like ``parallel.nproc_per_node``) and at
(1, 1, 1) from the same seed, on the same mock data, and compares every step's loss and gradient
norm within a tolerance for the dtype. Then it checks ring attention's forward and backward at the
configured cp (kernel, layout, ring backward, window, dtype) against float64 attention over the
whole sequence (:mod:`megaring.ring.selfcheck`). Prints one row per step and one for the ring
check; exit 0 when all pass, 1 naming the first failing step or the ring check, 2 on a config error.

Run it after changing the layout, the attention kernel or the backward schedule, and after
upgrading torch or DeepSpeed::

    megaring-verify parallel.dp=2 parallel.cp=2 parallel.zero_stage=2 model=7b trainer.seq_len=131072
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from megaring.cli.train import refuse_unknown_keys
from megaring.config_dir import CONFIG_DIR
from megaring.errors import ConfigError
from megaring.ops.faults import ring_drop
from megaring.ops.spawn import launch
from megaring.outdir import OutputError, OwnOutput, clear_own
from megaring.ring.selfcheck import RingCase, check_ring
from megaring.train.config import TrainConfig, register_configs, to_train_config
from megaring.train.config_checks import dynamic_cp_problems, model_problems, parallel_problems
from megaring.train.metrics import read_metrics

register_configs()

STEPS = 3
# Relative tolerance on the loss and gradient norm: fp32 reorders sums only; bf16 rounds each layout differently.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# Ring attention against float64, relative to the largest value: fp32 reorders sums only; bf16 keeps
# 8 mantissa bits with fp32 accumulation, a few ulps of the largest value (tests/dist/test_ring_attention.py).
RING_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# <run dir>/verify holds the two runs and nothing else; it is emptied at each verify (megaring.outdir).
VERIFY_OUTPUT = OwnOutput("an earlier megaring-verify's runs", markers=(), entries=("reference", "layout"))


def shrink(cfg: TrainConfig) -> TrainConfig:
    """The same mesh, kernels, schedule and precision on a small model and batch, mock data, no logging."""
    p, t, m = cfg.parallel, cfg.trainer, cfg.model
    head_dim = 16
    model = dataclasses.replace(m, dim=m.n_heads * head_dim, n_layers=2, ffn_dim=4 * m.n_heads * head_dim,
                                vocab_size=256 * p.tp, init_from=None, max_position_embeddings=1 << 20)
    seq_len = 32 * p.cp * p.tp  # zigzag halves per cp rank, divisible by tp for sequence parallelism
    trainer = dataclasses.replace(t, seq_len=seq_len, global_batch_size=2 * p.dp, micro_batch_size=1,
                                  max_steps=STEPS, checkpoint_every=0, log_every=1, ckpt_dir=None, resume=False)
    data = dataclasses.replace(cfg.data, kind="mock", path=None, valid_path=None, valid_fraction=0.0,
                               vocab_size=model.vocab_size)
    logging_cfg = dataclasses.replace(cfg.logging, progress_bar=False,
                                      wandb=dataclasses.replace(cfg.logging.wandb, mode="disabled"))
    parallel = dataclasses.replace(p, nproc_per_node="auto")
    return dataclasses.replace(cfg, model=model, trainer=trainer, data=data, logging=logging_cfg, parallel=parallel,
                               eval=dataclasses.replace(cfg.eval, every=0))


def single_process(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=1, cp=1, tp=1, ulysses=1,
                                                                 nproc_per_node=0, sequence_parallel=False))


def layout_problems(cfg: TrainConfig) -> list[str]:
    """The configured layout as training checks it, before :func:`shrink` (whose sizes follow from
    it): the messages name the keys the user gave, not the shrunk run's."""
    p = cfg.parallel
    return parallel_problems(cfg, p.dp * p.cp * p.tp) + dynamic_cp_problems(cfg) + model_problems(cfg)


def compare(layout: list[dict], reference: list[dict], rel: float) -> tuple[list[str], int | None]:
    """One row per step and the first failing step (None: all pass)."""
    rows, first_bad = [], None
    for got, ref in zip(layout, reference, strict=True):
        diffs = {k: relative(got[k], ref[k]) for k in ("loss", "grad_norm")}
        ok = all(d <= rel for d in diffs.values())
        if not ok and first_bad is None:
            first_bad = got["step"]
        rows.append(f"  step {got['step']}: loss {got['loss']!s:>22} vs {ref['loss']!s:>22} (rel {diffs['loss']:.1e}), "
                    f"grad_norm rel {diffs['grad_norm']:.1e}  {'pass' if ok else 'FAIL'}")
    return rows, first_bad


def relative(a, b) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def verify(cfg: TrainConfig, out_dir: Path) -> int:
    problems = layout_problems(cfg)
    if problems:
        raise ConfigError.listing(problems)
    small = shrink(cfg)
    p = small.parallel
    dtype = small.trainer.dtype if small.trainer.dtype != "auto" else (
        "bfloat16" if torch.cuda.is_available() else "float32")
    rel = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    print(f"megaring-verify: dp={p.dp} cp={p.cp} tp={p.tp} ulysses={p.ulysses} zero_stage={p.zero_stage} "
          f"layout={p.layout} "
          f"kernel={p.attn_kernel or 'auto'} ring_backward={p.ring_backward} dtype={small.trainer.dtype} vs (1, 1, 1); "
          f"{STEPS} steps, seq_len {small.trainer.seq_len}, tolerance {rel:g} (relative)", flush=True)
    clear_own(out_dir, VERIFY_OUTPUT)  # an earlier verify's runs; anything else there is refused
    runs = {}
    for name, run_cfg in (("reference", single_process(small)), ("layout", small)):
        status = launch(run_cfg, out_dir / name)
        if status:
            print(f"megaring-verify: the {name} run failed (exit status {status})", file=sys.stderr)
            return 1
        runs[name] = [m for m in read_metrics(out_dir / name / "metrics.jsonl") if "loss" in m]
    rows, first_bad = compare(runs["layout"], runs["reference"], rel)
    print("\n".join(rows), flush=True)
    ring_line, ring_ok = checked_ring(small, getattr(torch, dtype))
    print(ring_line, flush=True)
    if first_bad is not None:
        print(f"megaring-verify: FAIL: step {first_bad} differs from the single-process run by more than {rel:g}",
              file=sys.stderr)
    if not ring_ok:
        print(f"megaring-verify: FAIL: ring attention at cp={p.cp} differs from float64 attention (see above)",
              file=sys.stderr)
    if first_bad is not None or not ring_ok:
        return 1
    print("megaring-verify: pass")
    return 0


def ring_check(cfg: TrainConfig, dtype: torch.dtype) -> tuple[str, bool]:
    """Ring attention's forward and backward at the configured cp, kernel, layout, ring backward,
    window and dtype against float64 attention: the report line and whether it passed."""
    p, m = cfg.parallel, cfg.model
    ring = p.cp // p.ulysses  # the ring's size; Ulysses' all-to-all is checked by the training comparison
    if ring == 1:
        return f"  ring attention: cp={p.cp} with ulysses={p.ulysses}, no ring to check", True
    gpus = torch.cuda.device_count() if p.backend != "gloo" else 0
    if 0 < gpus < ring:
        return f"  ring attention: a ring of {ring} needs {ring} GPUs on this machine, it has {gpus}: not checked", True
    case = RingCase(ring, p.layout, p.attn_kernel, p.ring_backward, m.sliding_window, m.n_heads,
                    m.n_kv_heads or m.n_heads, dtype, p.ring(), p.backend, drop_block=ring_drop())
    errors = check_ring(case, timeout_s=p.timeout_s)
    tol = RING_TOLERANCE.get(dtype, RING_TOLERANCE[torch.bfloat16])
    passed = all(e <= tol for e in errors.values())  # NaN fails
    detail = ", ".join(f"{name} {err:.1e}" for name, err in errors.items())
    return (f"  ring attention forward/backward ({case.describe()}) vs float64: max error relative to the "
            f"largest value {detail} (tolerance {tol:g})  {'pass' if passed else 'FAIL'}"), passed


def checked_ring(cfg: TrainConfig, dtype: torch.dtype) -> tuple[str, bool]:
    """The ring attention check's line and verdict; an error in it is a failure, not a traceback."""
    try:
        return ring_check(cfg, dtype)
    except Exception as err:  # noqa: BLE001 - a worker's error, reported as the check's failure
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return f"  ring attention forward/backward at cp={cfg.parallel.cp}: raised {last}  FAIL", False


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        status = verify(to_train_config(cfg, hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir) / "verify")
    except (ConfigError, OutputError) as err:
        print(f"megaring-verify: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


def main() -> None:
    refuse_unknown_keys("megaring-verify", sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
