"""``megaring-eval``'s worker: load a model at any layout, run the evaluation tasks, write the report.

The model is a run checkpoint's layout-independent state (``checkpoint=``, written at any layout
and ZeRO stage), a Hugging Face directory (``model.init_from``), or the seed. The mesh is
``parallel.*``'s, built exactly like the trainer's; the same functions as the trainer's evaluation
score it (:func:`megaring.train.eval_loss.evaluate_sources` for ``position_loss``,
:class:`~megaring.retrieval.tasks.RetrievalTasks` for ``passkey`` / ``needle``). Global rank 0 holds
the run directory's lock and writes ``eval.jsonl``, ``eval.png`` and ``cases/`` (``save_cases``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megaring.errors import ConfigError

log = logging.getLogger(__name__)


def eval_problems(cfg, world_size: int, tasks: list[str]) -> list[str]:
    """Every problem of an evaluation config: the trainer's checks of the model, layout and data
    (the held-out data only for ``position_loss``) and the retrieval tasks'."""
    from megaring.retrieval import retrieval_problems
    from megaring.train.config_checks import collect_problems
    from megaring.train.eval_loss import EVAL_TASKS

    out = []
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        out.append(f"tasks= names {unknown}: the tasks are {list(EVAL_TASKS)}")
    if not tasks:
        out.append("tasks= is empty: name at least one of " + ", ".join(EVAL_TASKS))
    loss_tasks = [t for t in tasks if t == "position_loss"]
    checked = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=1 if loss_tasks else 0,
                                                                tasks=loss_tasks))
    return out + collect_problems(checked, world_size) + retrieval_problems(cfg, tasks)


@dataclass(frozen=True)
class EvalJob:
    """What each worker runs (picklable): the evaluated checkpoint's step directory, or None."""

    step_dir: str | None
    tasks: tuple[str, ...]
    prog: str = "megaring-eval"

    def __call__(self, cfg, run_dir, hydra_files=None) -> list[dict]:
        return evaluate_model(cfg, Path(run_dir), list(self.tasks), Path(self.step_dir) if self.step_dir else None,
                              hydra_files)


def evaluate_model(cfg, run_dir: Path, tasks: list[str], step_dir: Path | None = None,
                   hydra_files: dict | None = None) -> list[dict]:
    """Evaluate and return the records (every rank); rank 0 writes them. See the module docstring."""
    from megaring.checkpoint.rundir import RunLocks, write_hydra_files
    from megaring.checkpoint.universal import UniversalState
    from megaring.data import build_eval_readers
    from megaring.distributed import build_mesh, init_distributed
    from megaring.distributed.env import read_launch_env
    from megaring.distributed.init import device_for
    from megaring.engine.deepspeed_engine import build_engine
    from megaring.model import ParallelContext
    from megaring.retrieval import RetrievalTasks
    from megaring.retrieval.report import position_records
    from megaring.train.eval_loss import evaluate_sources, position_edges
    from megaring.train.trainer import build_weights, rank_shard, seed_everything

    owns_group = not dist.is_initialized()
    env = read_launch_env()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if not owns_group else (env.world_size, env.rank)
    lock = RunLocks(run_dir, run_dir, saves=False).acquire() if rank == 0 else None
    try:
        problems = eval_problems(cfg, world_size, tasks)  # every rank, before any collective
        if problems:
            raise ConfigError.listing(problems)
        tokenizer = UniversalState(step_dir).directory / "tokenizer" if step_dir is not None else None
        retrieval = RetrievalTasks.build(cfg, tasks, tokenizer)  # every case, before any collective
        if rank == 0 and hydra_files:
            write_hydra_files(run_dir, hydra_files)
        p = cfg.parallel
        device = device_for(init_distributed(p.backend, p.timeout_s, single_process_group=True,
                                             net_iface=p.net_iface), p.backend)
        began = time.perf_counter()
        mesh = build_mesh(p.dims(), device.type, timeout_s=p.timeout_s)
        seed_everything(cfg.trainer.seed)
        ctx = ParallelContext.from_mesh(mesh, sequence_parallel=p.sequence_parallel, layout=p.layout,
                                        attn_kernel=p.attn_kernel, ring_backward=p.ring_backward,
                                        ring_settings=p.ring())
        engine = build_engine(build_weights(cfg, ctx, mesh, device, universal=step_dir), cfg, mesh, device)
        shard = rank_shard(mesh, p.layout)
        records = []
        try:
            if "position_loss" in tasks:
                readers = build_eval_readers(cfg.data, cfg.trainer.batch_shape(), shard)
                edges = position_edges(cfg.trainer.seq_len, cfg.eval_tasks.position_loss.buckets)
                records += position_records(evaluate_sources(engine, readers, cfg.eval.batches, mesh, device, edges))
            if retrieval is not None:
                records += retrieval.evaluate(engine, mesh, shard, device, run_dir / "cases")
        finally:
            engine.destroy()
        records.append({"task": "run", "seconds": time.perf_counter() - began, "world_size": world_size,
                        "peak_mem_gib": peak_memory_gib(device)})
        if rank == 0:
            report(cfg, run_dir, records, world_size, time.perf_counter() - began, step_dir)
        return records
    finally:
        if lock is not None:
            lock.release()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def peak_memory_gib(device) -> float:
    """The largest peak memory of any rank: the device's allocator peak on CUDA, the process's
    resident set on CPU (what the operating system saw, the model and the runtime included)."""
    import resource

    import torch

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    value = torch.tensor([peak], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return round(float(value.item()), 3)


def report(cfg, run_dir: Path, records: list[dict], world_size: int, seconds: float, step_dir: Path | None) -> None:
    """Rank 0: the files, wandb (when enabled) and the table on stdout."""
    from megaring.retrieval.report import plot, table, write_records
    from megaring.train.tracking import Tracker

    path = write_records(run_dir, records)
    picture = plot(run_dir, records)
    tracker = Tracker(cfg, run_dir, rank=0, world_size=world_size)
    flat = {"step": 0}
    for r in records:
        if r["task"] in ("passkey", "needle"):
            flat[f"eval/{r['task']}/{r['length']}/{r['depth']:g}"] = r["score"]
        elif r["task"] == "position_loss":
            flat[f"eval/position_loss/{r['start']}-{r['end']}"] = r["loss"]
    tracker.log(flat)
    tracker.finish(0)
    source = step_dir or cfg.model.init_from or f"seed {cfg.trainer.seed}"
    run = next(r for r in records if r["task"] == "run")
    print(f"megaring-eval: {source} at {cfg.parallel.layout_key()}, {seconds:.1f} s, peak memory per rank "
          f"{run['peak_mem_gib']:.2f} GiB", flush=True)
    print(table(records), flush=True)
    print(f"records: {path}" + (f"; plot: {picture}" if picture else
                                "; no eval.png: install matplotlib (pip install 'megaring[plots]')"), flush=True)
