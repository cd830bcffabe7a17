"""``train(cfg, run_dir)``: validate, build the mesh, model, engine and data, then run the steps.

Every piece is built by its own ``build_*`` function; :func:`run_steps` is the training loop.
The function runs in each worker process, whatever started it (torchrun, deepspeed, srun, the
self-spawning entry point, or a test's worker pool with the process group already up).
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megaring.checkpoint.rundir import RunLocks, lr_horizon, result_config, write_hydra_files
from megaring.checkpoint.steps import (
    CheckpointError,
    TrainerState,
    find_latest,
    load_latest,
    read_trainer_state,
    save_checkpoint,
    tag_for,
)
from megaring.checkpoint.universal import UniversalState, load_optimizer, load_weights
from megaring.data import (
    BatchReader,
    EvalReader,
    RankShard,
    build_batch_reader,
    build_eval_readers,
    describe_data,
    store_identity,
)
from megaring.data.tokenizer import MODEL_FILES
from megaring.data.tokenizer.conventions import SIDE_FILES
from megaring.distributed import ParallelMesh, build_mesh, init_distributed
from megaring.distributed.env import read_launch_env
from megaring.distributed.flight import FLIGHT, HANG_DIR, HangWatch
from megaring.distributed.init import device_for, rank_hosts
from megaring.distributed.mesh import Axis, Traffic, build_cp_subaxis
from megaring.engine.deepspeed_engine import TrainEngine, build_engine, partitioned_construction, resolve_dtype
from megaring.hf import load_hf_weights
from megaring.model import ParallelContext, Transformer, model_flops_per_token
from megaring.model.init import init_weights
from megaring.ops.faults import Fault
from megaring.ops.preempt import Preempted, PreemptWatch
from megaring.retrieval import RetrievalTasks, retrieval_metrics
from megaring.train.attention_work import attention_work, visible_pairs
from megaring.train.config import TrainConfig
from megaring.train.config_checks import validate
from megaring.train.eval_loss import evaluate_sources, position_edges
from megaring.train.guards import NumericGuard
from megaring.train.metrics import (
    MetricsFile,
    ProgressBar,
    StepMemory,
    device_peak_tflops,
    log_to_run_dir,
    step_metrics,
)
from megaring.train.profile import StepProfiler
from megaring.train.schedule import learning_rate
from megaring.train.stages import Stage, build_stages, stage_at, stage_seed
from megaring.train.step import train_step
from megaring.train.tracking import Tracker, mesh_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from: same layout (the engine's own files, bit-identical) or
    another one (through its layout-independent state)."""

    path: Path
    state: TrainerState
    same_layout: bool
    note: str | None = None  # said when ``latest`` was missing (megaring.checkpoint.steps.find_latest)


@dataclass
class Run:
    """What the loop needs, built once."""

    cfg: TrainConfig
    run_dir: Path
    ckpt_dir: Path
    mesh: ParallelMesh
    device: torch.device
    engine: TrainEngine
    stages: list[Stage]  # data.stages (one stage of the trainer's values without)
    stage: Stage  # the stage of the next step; its config is what the step reads (seq_len, batch, weights)
    ctx: ParallelContext  # the model's (its cp axis changes between stages under parallel.dynamic_cp)
    cp_axes: dict[int, Axis]  # the attention cp axis of every stage, by size, built at start-up
    reader: BatchReader  # the stage's
    eval_readers: dict[str, EvalReader] | None  # by source ({"": reader} for one store); None: eval.every = 0
    resume: Resume | None
    data_identity: dict | None  # megaring.data.store_identity, recorded in every checkpoint
    traffic: Traffic  # ring attention's K/V bytes sent by this rank, read and reset every step
    lr_horizon: int  # the schedule's decay horizon (the checkpoint's unless changed explicitly)
    lr_note: str | None  # said when the horizon is not the checkpoint's
    fault: Fault  # the test-only MEGARING_TEST_FAULT, parsed once (no fault for users)
    retrieval: RetrievalTasks | None = None  # the cases of eval.tasks' passkey / needle (built once)


def checkpoint_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.trainer.ckpt_dir) if cfg.trainer.ckpt_dir else run_dir / "checkpoints"


def train(cfg: TrainConfig, run_dir: str | Path, hydra_files: dict[str, str] | None = None) -> list[dict]:
    """Train to ``trainer.max_steps`` (resuming when a checkpoint exists); returns this run's metrics.

    Global rank 0 first locks the run and checkpoint directories, and once the config is valid
    writes ``hydra_files`` (Hydra's record of the command, :func:`megaring.checkpoint.rundir.write_hydra_files`).

    Raises :class:`~megaring.ops.preempt.Preempted` after a signal and a checkpoint, and
    :class:`~megaring.train.guards.Diverged` after too many non-finite steps.
    """
    run_dir = Path(run_dir)
    owns_group = not dist.is_initialized()
    env = read_launch_env()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if not owns_group else (env.world_size, env.rank)
    ckpt_dir = checkpoint_dir(cfg, run_dir)
    saves = cfg.trainer.max_steps > 0
    lock = RunLocks(run_dir, ckpt_dir, saves).acquire() if rank == 0 else None  # before reading or writing anything
    watch = PreemptWatch(cfg.trainer.preempt_grace_s, rank).install()
    hang = HangWatch(run_dir, rank, world_size, after_s=0.9 * cfg.parallel.timeout_s)
    previous_usr2 = install_hang_signal(hang)
    try:
        validate(cfg, world_size, ckpt_dir)  # every rank, before any collective
        if rank == 0:
            shutil.rmtree(run_dir / HANG_DIR, ignore_errors=True)  # an earlier hang's lines
            if hydra_files:
                write_hydra_files(run_dir, hydra_files)
        p = cfg.parallel
        device = device_for(init_distributed(p.backend, p.timeout_s, single_process_group=True,
                                                  net_iface=p.net_iface), p.backend)
        FLIGHT.joined(rank_hosts(), (env.master_addr, env.master_port))  # for hang reports across hosts
        run = build_run(cfg, run_dir, device)
        hang.start()
        return run_steps(run, watch)
    except Preempted:
        watch.hand_on()  # saved: now the signal's previous handler (submitit requeues the job)
        raise
    finally:
        hang.close()
        if previous_usr2 is not None:
            signal.signal(signal.SIGUSR2, previous_usr2)
        watch.uninstall()
        if lock is not None:
            lock.release()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def install_hang_signal(hang: HangWatch):
    """SIGUSR2 writes this rank's hang line; returns the previous handler (None: not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGUSR2, hang.on_signal)


def find_resume(cfg: TrainConfig, ckpt_dir: Path) -> Resume | None:
    found = read_trainer_state(ckpt_dir) if cfg.trainer.resume else None
    if found is None:
        return None
    tag, state = found
    latest = find_latest(ckpt_dir)
    return Resume(ckpt_dir / tag, state, state.layout == cfg.parallel.layout_key(), latest.note if latest else None)


def build_weights(cfg: TrainConfig, ctx: ParallelContext, mesh: ParallelMesh, device: torch.device, *,
                  universal: Path | None = None, pretrained: bool = True) -> Transformer:
    """This rank's model shards, built under :func:`partitioned_construction` (ZeRO-3 partitions
    every module as it is built: the one ZeRO-3 path) and filled parameter by parameter from the
    layout-independent state of the step directory ``universal`` (a checkpoint of any layout), a
    Hugging Face checkpoint (``model.init_from``, when ``pretrained``), or the seed (also when the
    engine's own files will overwrite them)."""
    with partitioned_construction(cfg, mesh, device) as writer:
        model = Transformer(cfg.model, ctx)
    if universal is not None:
        load_weights(model, UniversalState(universal), ctx.tp, writer)
    elif cfg.model.init_from and pretrained:
        load_hf_weights(model, ctx, cfg.model.init_from, writer)
    else:
        init_weights(model, cfg.model, ctx, seed=cfg.trainer.seed, writer=writer)
    return model


def build_run(cfg: TrainConfig, run_dir: Path, device: torch.device) -> Run:
    p, t = cfg.parallel, cfg.trainer
    retrieval = RetrievalTasks.build(cfg, cfg.eval.tasks) if cfg.eval.every > 0 else None  # before any collective
    mesh = build_mesh(p.dims(), device.type, timeout_s=p.timeout_s)
    seed_everything(t.seed)
    traffic = Traffic()
    resume = find_resume(cfg, checkpoint_dir(cfg, run_dir))
    stages = build_stages(cfg)
    stage = stage_at(stages, (resume.state.step if resume else 0) + 1)
    # every stage's attention cp (mesh.cp unless parallel.dynamic_cp), in one order on every rank
    sizes = sorted({s.cfg.attention_cp() for s in stages})
    cp_axes = {size: build_cp_subaxis(mesh, size, p.timeout_s) for size in sizes}
    ctx = ParallelContext.from_mesh(mesh, cp=cp_axes[stage.cfg.attention_cp()],
                                    sequence_parallel=p.sequence_parallel, layout=p.layout, attn_kernel=p.attn_kernel,
                                    ring_backward=p.ring_backward, ring_settings=p.ring(), traffic=traffic)
    model = build_weights(stage.cfg, ctx, mesh, device, universal=resume.path if resume and not resume.same_layout
                          else None, pretrained=resume is None)
    engine = build_engine(model, stage.cfg, mesh, device)
    reader, eval_readers = stage_readers(stage, mesh, ctx.cp)
    horizon, lr_note = lr_horizon(cfg, resume.state if resume else None)
    return Run(cfg, run_dir, checkpoint_dir(cfg, run_dir), mesh, device, engine, stages, stage, ctx, cp_axes, reader,
               eval_readers, resume, store_identity(cfg.data), traffic, horizon, lr_note, Fault.from_env(), retrieval)


def stage_readers(stage: Stage, mesh: ParallelMesh, attention_cp: Axis
                  ) -> tuple[BatchReader, dict[str, EvalReader] | None]:
    """The training reader (the stage's sample order, :func:`stage_seed`) and the eval readers of ``stage``."""
    cfg = stage.cfg
    t, shard = cfg.trainer, rank_shard(mesh, cfg.parallel.layout, attention_cp)
    reader = build_batch_reader(cfg.data, t.batch_shape(), shard, seed=stage_seed(t.seed, stage.index),
                                window=cfg.model.sliding_window)
    eval_readers = build_eval_readers(cfg.data, t.batch_shape(), shard) if cfg.eval.every > 0 else None
    return reader, eval_readers


def enter_stage(run: Run, stage: Stage) -> str:
    """Switch ``run`` to ``stage`` between two steps: attention's cp axis, the model's RoPE,
    DeepSpeed's batch, the readers. The same on every rank (collective-free: the axes exist)."""
    cfg = stage.cfg
    axis = run.cp_axes[cfg.attention_cp()]
    if axis is not run.ctx.cp:
        run.ctx.rebind_cp(axis)
    run.engine.module.set_rope(cfg.model)
    run.engine.set_batch(cfg)
    run.reader, run.eval_readers = stage_readers(stage, run.mesh, axis)
    run.stage = stage
    parts = [f"rope_theta {cfg.model.rope_theta:g}"]
    if cfg.model.rope_scaling:
        parts.append(f"rope_scaling {cfg.model.rope_scaling}")
    if cfg.data.kind == "mixture":
        parts.append(f"sources { {name: spec['weight'] for name, spec in cfg.data.sources.items()} }")
    return f"{stage.describe()} begins: {', '.join(parts)}, attention cp {axis.size}"


def rank_shard(mesh: ParallelMesh, layout: str, attention_cp: Axis | None = None) -> RankShard:
    """The part of every batch this rank reads; ``attention_cp``: the cp sub-group attention runs on
    (``parallel.dynamic_cp``), whose ``cp / cp'`` groups take different micro-batches."""
    cp = attention_cp or mesh.cp
    groups = mesh.cp.size // cp.size
    return RankShard(mesh.dp.rank, mesh.dp.size, cp.rank, cp.size, layout, groups, mesh.cp.rank // cp.size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_steps(run: Run, watch: PreemptWatch | None = None) -> list[dict]:
    cfg, t, rank = run.cfg, run.cfg.trainer, run.mesh.rank
    watch = watch or PreemptWatch(t.preempt_grace_s, rank)  # installed by train(); here: never signalled
    is_logger = rank == 0
    start, note = resume_state(run)
    metrics_file = MetricsFile(run.run_dir / cfg.logging.metrics_file, start, mesh_record(cfg)) if is_logger else None
    tracker = Tracker(cfg, run.run_dir, rank=rank, world_size=run.mesh.dims.world_size,
                      active=start < t.max_steps or run.eval_readers is not None)  # else nothing to log
    progress = ProgressBar(is_logger, cfg.logging.progress_bar, start, t.max_steps)
    if is_logger:
        log_to_run_dir(run.run_dir)
    st = run.stage.cfg.trainer
    started = (f"run {run.run_dir}: model {cfg.model.name} ({cfg.model.init_from or 'seed ' + str(t.seed)}), "
               f"{run.mesh.describe()}, ZeRO {cfg.parallel.zero_stage}, seq_len {st.seq_len}, "
               f"global batch {st.global_batch_size}, steps {start + 1}-{t.max_steps}"
               + (f", {len(run.stages)} stages, now {run.stage.describe()}" if len(run.stages) > 1 else ""))
    for line in (started, run.resume and run.resume.note, note, run.lr_note, finished_note(start, t.max_steps)):
        if line:
            progress.note(line)
    meters = StepMeters(StepProfiler(t.profile_steps, run.run_dir / "profile", rank, run.device),
                        StepMemory(run.device), NumericGuard(t.max_bad_steps, t.loss_spike_factor),
                        device_peak_tflops(run.device, cfg.logging.peak_tflops))
    history, exit_code = [], 1

    def log_record(record: dict) -> None:
        history.append(record)
        if is_logger:
            metrics_file.write(record)
            tracker.log(record)

    def log_eval(step: int) -> None:
        edges = (position_edges(run.stage.seq_len, cfg.eval_tasks.position_loss.buckets)
                 if "position_loss" in cfg.eval.tasks else None)
        measured = evaluate_sources(run.engine, run.eval_readers, cfg.eval.batches, run.mesh, run.device, edges)
        if run.retrieval is not None:
            shard = rank_shard(run.mesh, cfg.parallel.layout, run.ctx.cp)
            measured |= retrieval_metrics(run.retrieval.evaluate(run.engine, run.mesh, shard, run.device,
                                                                 run.run_dir / "cases"))
        record = {"step": step, **measured}
        scores = "".join(f", {t} {record['eval/' + t]:.3f}" for t in ("passkey", "needle") if f"eval/{t}" in record)
        progress.note(f"step {step}: eval_loss {record['eval_loss']:.4f}, eval_ppl {record['eval_ppl']:.4g} "
                      f"({record['eval_tokens']:,} tokens){scores}")
        log_record(record)

    try:
        if run.eval_readers is not None and t.max_steps <= start:  # nothing to train: evaluate the model as it is
            log_eval(start)
        for step in range(start + 1, t.max_steps + 1):
            if step > run.stage.last:
                progress.note(enter_stage(run, stage_at(run.stages, step)))
            metrics, guard_note = measured_step(run, step, meters)
            progress.update(metrics)
            if guard_note:
                progress.note(guard_note)
            if step % t.log_every == 0 or step == t.max_steps or guard_note is not None:
                log_record(metrics)
            else:
                history.append(metrics)
            if run.eval_readers is not None and (step % cfg.eval.every == 0 or step == t.max_steps):
                log_eval(step)
            saved = step == t.max_steps or bool(t.checkpoint_every and step % t.checkpoint_every == 0)
            if saved:
                FLIGHT.at(phase="checkpoint save")
                save(run, step)
            with FLIGHT.waiting("all-reduce of the preemption flag over the world", everyone_else(run.mesh)):
                signum = watch.agreed_stop(run.device)  # one tiny all-reduce: every rank stops after this step
            if signum is not None:
                exit_code = t.preempt_exit_code
                stop_on_signal(run, step, signum, saved, progress)
        if start < t.max_steps:
            progress.note(f"done: step {t.max_steps}, checkpoint {run.ckpt_dir / tag_for(t.max_steps)}")
        exit_code = 0
    finally:
        progress.close()
        tracker.finish(exit_code)
        if metrics_file:
            metrics_file.close()
        run.engine.destroy()
    return history


@dataclass(frozen=True)
class StepMeters:
    """What :func:`measured_step` measures a step with; one set per run."""

    profiler: StepProfiler
    memory: StepMemory
    guard: NumericGuard
    peak_tflops: float | None


def measured_step(run: Run, step: int, meters: StepMeters) -> tuple[dict, str | None]:
    """Train ``step``; its metrics record and the numeric guard's note (None when the step was healthy)."""
    cfg, t, stage = run.cfg, run.stage.cfg.trainer, run.stage
    FLIGHT.at(step=step, phase="data")
    run.fault.at_step(run.mesh.rank, step, run.engine.module)
    meters.memory.start()
    began = time.perf_counter()
    lr = learning_rate(step - 1, cfg.optim, run.lr_horizon)
    batches = run.reader.micro_batches(stage.local_step(step))
    with meters.profiler.around(step):
        mixture = run.reader.mixture
        result = train_step(run.engine, batches, run.mesh, run.device, lr,
                            num_sources=len(mixture.names) if mixture is not None else 0)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    step_time_s = time.perf_counter() - began
    guarded, note = meters.guard.check(step, result)  # the same on every rank; raises Diverged
    work = attention_work(visible_pairs(batches, cfg.model.sliding_window), run.traffic.take(), run.mesh, run.device)
    tokens_per_step = t.global_batch_size * t.seq_len
    flops_per_token = model_flops_per_token(cfg.model, t.seq_len, work.pairs_total / tokens_per_step)
    metrics = step_metrics(step, result, step_time_s=step_time_s, tokens_per_step=tokens_per_step,
                           flops_per_token=flops_per_token, world_size=run.mesh.dims.world_size,
                           peak_tflops=meters.peak_tflops, tokens_seen=stage.tokens_after(step), memory=meters.memory)
    consumed = run.reader.consumed_samples(stage.local_step(step))  # in the stage's own order
    dp_work = {"work_dp_imbalance": run.reader.step_plan(consumed).dp_imbalance,
               "effective_cp": run.reader.shard.cp_size}
    if len(run.stages) > 1:
        dp_work |= {"stage": stage.index, "seq_len": t.seq_len, "global_batch_size": t.global_batch_size}
    if run.reader.mixture is not None:
        dp_work["source_samples"] = run.reader.mixture.step_counts(consumed)
        for name, (loss, tokens) in zip(run.reader.mixture.names, result.source_losses or ()):
            dp_work[f"loss/{name}"] = loss if tokens else None  # None: no trained token of it this step
    return metrics | work.metrics() | dp_work | guarded, note


def stop_on_signal(run: Run, step: int, signum: int, saved: bool, progress: ProgressBar) -> None:
    """Save at the agreed ``step`` (unless just saved) and raise :class:`Preempted`."""
    began = time.perf_counter()
    if not saved:
        save(run, step)
    code = run.cfg.trainer.preempt_exit_code
    message = (f"{signal.Signals(signum).name}: stopped after step {step}; checkpoint {run.ckpt_dir / tag_for(step)} "
               f"written in {time.perf_counter() - began:.1f} s; re-run the same command to resume "
               f"(exit status {code}, trainer.preempt_exit_code)")
    progress.note(message)
    raise Preempted(message, code)


def everyone_else(mesh: ParallelMesh) -> tuple[int, ...]:
    return tuple(r for r in range(mesh.dims.world_size) if r != mesh.rank)


def finished_note(start: int, max_steps: int) -> str | None:
    if start >= max_steps:
        return (f"nothing to train: the checkpoint is at step {start} and trainer.max_steps={max_steps}; "
                "raise trainer.max_steps to continue the run")
    return None


def resume_state(run: Run) -> tuple[int, str | None]:
    """Restore the engine from ``run.resume``; returns the step to continue after and a note for the user."""
    r = run.resume
    if r is None:
        return 0, None
    if r.same_layout:
        load_latest(run.engine, run.ckpt_dir)
        return r.state.step, f"resumed from step {r.state.step} ({r.path})"
    began = time.perf_counter()
    load_optimizer(run.engine, UniversalState(r.path))
    return r.state.step, (f"resumed from step {r.state.step} ({r.path}), written at {r.state.layout}, on "
                          f"{run.cfg.parallel.layout_key()}: weights and Adam state converted through its "
                          f"layout-independent state in {time.perf_counter() - began:.1f} s")


def save(run: Run, step: int) -> None:
    t = run.cfg.trainer
    state = TrainerState(step=step, consumed_samples=run.stage.samples_after(step),
                         tokens_seen=run.stage.tokens_after(step), layout=run.cfg.parallel.layout_key(),
                         lr_horizon=run.lr_horizon, config=result_config(run.cfg), data=run.data_identity)
    universal = {"model_cfg": run.stage.cfg.model, "dtype": resolve_dtype(t.dtype, run.device),
                 "tokenizer_files": tokenizer_files(run.cfg)} if t.universal_at(step) else None
    if not run.engine.has_optimizer_state():  # every step so far was skipped (e.g. empty)
        run.engine.prime_optimizer_states(0)  # Adam's fresh state, so that the checkpoint has moments to save
    try:
        save_checkpoint(run.engine, run.ckpt_dir, state, keep_last=t.keep_last, universal=universal,
                        fault=run.fault)
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(run.ckpt_dir if run.ckpt_dir.exists() else run.run_dir).free
        if free < 2**30 or getattr(err, "errno", None) == errno.ENOSPC:  # torch's writer says "iostream error"
            raise CheckpointError(f"saving the checkpoint of step {step} into {run.ckpt_dir} failed: no space left "
                                  f"on device (ENOSPC, {free / 2**20:.0f} MiB free; {err}). The previous checkpoint "
                                  "stays 'latest': free space, then re-run to resume") from None
        raise


# What a chat model needs beside its tokenizer; carried from model.init_from when the store lacks them.
CHAT_FILES = ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def tokenizer_files(cfg: TrainConfig) -> list[str]:
    """The tokenizer files an exported model should carry: the data store's, else the init_from checkpoint's,
    plus the init_from checkpoint's chat files (:data:`CHAT_FILES`) the store does not have."""
    files: list[str] = []
    if cfg.data.kind == "files" and cfg.data.path:
        files = [str(p) for p in describe_data(cfg.data).tokenizer_files]
    if not cfg.model.init_from:
        return files
    wanted = CHAT_FILES if files else (*MODEL_FILES, *SIDE_FILES, *CHAT_FILES)
    have = {Path(f).name for f in files}
    extra = [str(p) for p in sorted(Path(cfg.model.init_from).iterdir()) if p.name in wanted and p.name not in have]
    return files + extra

