"""Every invariant of a training config, checked on every rank before any collective.

Each part contributes readable lines; :func:`validate` raises one :class:`ConfigError` listing
all of them, so a user fixes a broken command in one go instead of one failed launch per problem.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict
from pathlib import Path

from megaring.checkpoint.rundir import (
    DATA_STORE_KEY,
    config_change_problems,
    data_identity_problems,
    history_problems,
    result_config,
)
from megaring.checkpoint.steps import (
    CheckpointError,
    TrainerState,
    older_advice,
    read_trainer_state,
    step_dir_problems,
    universal_file_problems,
)
from megaring.checkpoint.universal import META, UNIVERSAL, UniversalError, UniversalState
from megaring.data import describe_data, eval_data_problems, store_identity, tokenizer_vocab_problems
from megaring.data.eval_reader import eval_batch_problems
from megaring.data.reader import mixture_problems
from megaring.distributed.init import backend_problems
from megaring.distributed.net_iface import net_iface_problems
from megaring.engine.deepspeed_internals import installed_version
from megaring.engine.deepspeed_internals import version_problem as deepspeed_version_problem
from megaring.errors import ConfigError
from megaring.hf.config import checkpoint_signature
from megaring.hf.weights import checkpoint_problems
from megaring.kernels import KERNELS
from megaring.layout import LAYOUTS
from megaring.model import validate_model_config
from megaring.retrieval import retrieval_problems
from megaring.ring.backward import BACKWARDS
from megaring.train.config import DTYPES, SCHEDULES, WANDB_MODES, TrainConfig
from megaring.train.eval_loss import EVAL_TASKS, position_edges_problems
from megaring.train.profile import profile_steps_problems
from megaring.train.stages import Stage, build_stages, stage_seed, structure_problems

# DeepSpeed keys the trainer derives from its own config; parallel.deepspeed may not set them.
OWNED_DEEPSPEED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler",
)


def parallel_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    p = cfg.parallel
    out = p.dims().problems(world_size)
    if p.zero_stage not in (0, 1, 2, 3):
        out.append(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if p.layout not in LAYOUTS:
        out.append(f"parallel.layout={p.layout!r} must be one of {LAYOUTS}")
    if p.attn_kernel is not None and p.attn_kernel not in KERNELS:
        out.append(f"parallel.attn_kernel={p.attn_kernel!r} must be null (automatic) or one of {sorted(KERNELS)}")
    if p.ring_backward not in BACKWARDS:
        out.append(f"parallel.ring_backward={p.ring_backward!r} must be one of {sorted(BACKWARDS)}")
    try:
        p.local_workers()
    except ValueError as err:
        out.append(str(err))
    out += [f"parallel.ring_settings.{problem}" for problem in p.ring().problems()]
    if p.timeout_s <= 0:
        out.append(f"parallel.timeout_s={p.timeout_s} must be > 0")
    out += backend_problems(p.backend) + net_iface_problems(p.net_iface)
    owned = sorted(set(p.deepspeed) & set(OWNED_DEEPSPEED_KEYS))
    if owned:
        out.append(f"parallel.deepspeed may not set {owned}: they come from trainer.* and optim.*")
    if "stage" in p.deepspeed.get("zero_optimization", {}):
        out.append("parallel.deepspeed.zero_optimization.stage: use parallel.zero_stage")
    version = deepspeed_version_problem(installed_version(), p.allow_untested_deepspeed)
    return out + ([version] if version else [])


def dynamic_cp_problems(cfg: TrainConfig) -> list[str]:
    """``parallel.dynamic_cp``: tokens per rank some cp group can meet, and a ring-only cp."""
    p, seq_len = cfg.parallel, cfg.trainer.seq_len
    out = []
    if p.dynamic_cp_tokens < 0:
        out.append(f"parallel.dynamic_cp_tokens={p.dynamic_cp_tokens} must be >= 0 (0: trainer.seq_len / cp)")
    if not p.dynamic_cp:
        return out
    if p.cp >= 1 and p.dynamic_cp_tokens > 0 and p.dynamic_cp_tokens * p.cp < seq_len:
        out.append(f"parallel.dynamic_cp_tokens={p.dynamic_cp_tokens}: no cp group holds a sample of "
                   f"trainer.seq_len={seq_len} within that many tokens per rank, not even all of "
                   f"parallel.cp={p.cp} ({seq_len // p.cp} each): raise it to >= {-(-seq_len // p.cp)} or 0")
    if p.ulysses > 1:
        out.append(f"parallel.dynamic_cp regroups ring ranks only; with parallel.ulysses={p.ulysses} the Ulysses "
                   "all-to-all spans the whole cp group: set parallel.ulysses=1 or parallel.dynamic_cp=false")
    return out


def batch_problems(cfg: TrainConfig) -> list[str]:
    t, dp = cfg.trainer, cfg.parallel.dp
    out = [f"trainer.{n}={getattr(t, n)} must be >= 1" for n in
           ("seq_len", "global_batch_size", "micro_batch_size", "log_every", "keep_last") if getattr(t, n) < 1]
    out += [f"trainer.{n}={getattr(t, n)} must be >= 0" for n in ("max_steps", "checkpoint_every")
            if getattr(t, n) < 0]
    if not out and dp >= 1 and t.global_batch_size % (t.micro_batch_size * dp):
        out.append(f"trainer.global_batch_size={t.global_batch_size} must be divisible by "
                   f"trainer.micro_batch_size * parallel.dp = {t.micro_batch_size} * {dp}")
    if t.dtype not in DTYPES:
        out.append(f"trainer.dtype={t.dtype!r} must be one of {DTYPES}")
    return out + profile_steps_problems(t.profile_steps)


def operations_problems(cfg: TrainConfig) -> list[str]:
    """The failure-handling keys (preemption, numerical guards, resume)."""
    t, out = cfg.trainer, []
    if not 0 <= t.preempt_exit_code <= 255:
        out.append(f"trainer.preempt_exit_code={t.preempt_exit_code} must be an exit status in 0..255")
    if not t.preempt_grace_s > 0:
        out.append(f"trainer.preempt_grace_s={t.preempt_grace_s} must be > 0 seconds")
    if t.max_bad_steps < 0:
        out.append(f"trainer.max_bad_steps={t.max_bad_steps} must be >= 0 (0: stop at the first non-finite step)")
    if t.universal_every is not None and t.universal_every < 0:
        out.append(f"trainer.universal_every={t.universal_every} must be null (every checkpoint), 0 (none) or "
                   "a number of steps")
    if not t.loss_spike_factor >= 0:
        out.append(f"trainer.loss_spike_factor={t.loss_spike_factor} must be >= 0 (0 turns loss spikes off)")
    known = set(result_config(cfg)) | {DATA_STORE_KEY}
    unknown = [k for k in t.resume_allow_changes if k not in known]
    if unknown:
        out.append(f"trainer.resume_allow_changes names {unknown}, which are not keys a resume compares: "
                   f"give model.*, data.*, optim.* or trainer.* keys as section.key ({DATA_STORE_KEY}: another "
                   "token store)")
    return out


def finite_problems(cfg: TrainConfig) -> list[str]:
    """Every float in the config is a finite number (NaN would pass most range checks)."""
    out = []

    def walk(obj, prefix: str) -> None:
        for key, value in obj.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, float) and not math.isfinite(value):
                out.append(f"{prefix}{key}={value} must be a finite number")
            elif isinstance(value, list) and any(isinstance(x, float) and not math.isfinite(x) for x in value):
                out.append(f"{prefix}{key}={value} must hold finite numbers")

    walk(asdict(cfg), "")
    return out


def optim_problems(cfg: TrainConfig) -> list[str]:
    o, out = cfg.optim, []
    if not o.lr >= 0:  # 0 is allowed: a run that must not change the weights (tests, exports)
        out.append(f"optim.lr={o.lr} must be >= 0")
    if o.schedule not in SCHEDULES:
        out.append(f"optim.schedule={o.schedule!r} must be one of {SCHEDULES}")
    if o.warmup_steps < 0 or (o.decay_steps is not None and o.decay_steps < 1):
        out.append("optim.warmup_steps must be >= 0 and optim.decay_steps >= 1 (or null)")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        out.append(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.grad_clip < 0:
        out.append(f"optim.grad_clip={o.grad_clip} must be >= 0 (0 turns clipping off)")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        out.append(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    return out


def model_problems(cfg: TrainConfig) -> list[str]:
    """The model at this layout and, with ``model.init_from``, the checkpoint's files (headers only)."""
    p = cfg.parallel
    if min(p.tp, p.cp, p.ulysses) < 1 or p.layout not in LAYOUTS:
        return []  # reported by parallel_problems; the model checks would divide by them
    out = validate_model_config(cfg.model, tp=p.tp, cp=p.cp, ulysses=p.ulysses, seq_len=cfg.trainer.seq_len,
                                sequence_parallel=p.sequence_parallel, layout=p.layout)
    if cfg.model.init_from and not out:  # (a model that fails its own checks may not even build)
        out = [f"model.init_from: {problem}" for problem in checkpoint_problems(cfg.model, cfg.model.init_from)]
    return out


def data_problems(cfg: TrainConfig) -> list[str]:
    """The data config, a vocabulary that fits the model's embedding and, with ``model.init_from``, a
    tokenizer that is the checkpoint's."""
    out = cfg.data.problems()
    if out:
        return out
    try:
        info = describe_data(cfg.data)
    except (ValueError, OSError) as err:
        return [f"data: {err}"]
    if cfg.data.kind == "mixture" and cfg.trainer.seq_len >= 1 and cfg.trainer.global_batch_size >= 1:
        mixture = mixture_problems(cfg.data, cfg.trainer.batch_shape(), cfg.trainer.max_steps, cfg.trainer.seed)
        if mixture:
            return mixture
    if info.num_tokens <= cfg.trainer.seq_len:
        return [f"data.path={cfg.data.path} holds {info.num_tokens} tokens, not enough for one sample of "
                f"trainer.seq_len={cfg.trainer.seq_len} (+1 for the labels): preprocess more text, or lower "
                "trainer.seq_len"]
    if info.vocab_size > cfg.model.vocab_size and not cfg.model.init_from:
        where = {"files": f"data.path={cfg.data.path}", "mixture": "data.sources"}.get(cfg.data.kind, "data=mock")
        return [f"{where} has a vocabulary of {info.vocab_size} tokens, more than "
                f"model.vocab_size={cfg.model.vocab_size} (model={cfg.model.name}): use a model with "
                f"vocab_size >= {info.vocab_size}"]
    return tokenizer_vocab_problems(info, cfg.model.vocab_size, checkpoint_dir=cfg.model.init_from)


def eval_problems(cfg: TrainConfig) -> list[str]:
    """Evaluation settings, and validation data that exists and fits the training data."""
    e = cfg.eval
    out = [f"eval.{n}={getattr(e, n)} must be >= 0" for n in ("every", "batches") if getattr(e, n) < 0]
    unknown = [t for t in e.tasks if t not in EVAL_TASKS]
    if unknown:
        out.append(f"eval.tasks names {unknown}: the tasks are {list(EVAL_TASKS)}")
    if e.tasks and e.every <= 0:
        out.append(f"eval.tasks={list(e.tasks)} run at each evaluation: set eval.every > 0")
    out += position_edges_problems(cfg.eval_tasks.position_loss.buckets)
    out += retrieval_problems(cfg, e.tasks)
    edges = cfg.eval_tasks.position_loss.buckets or [0]
    if edges[-1] >= cfg.trainer.seq_len >= 1:
        out.append(f"eval_tasks.position_loss.buckets: the last edge {edges[-1]} must be below "
                   f"trainer.seq_len={cfg.trainer.seq_len}")
    if e.every > 0 and cfg.data.kind == "mixture":  # per source (eval_loss/<name>)
        if not cfg.data.problems() and cfg.trainer.seq_len >= 1 and cfg.trainer.global_batch_size >= 1:
            out += _eval_batch_problems(cfg)
        return out
    if e.every > 0 and not cfg.data.valid_path and cfg.data.valid_fraction <= 0:
        out.append(f"eval.every={e.every} needs validation data: set data.valid_path to a store written by "
                   "megaring-preprocess, or data.valid_fraction > 0 to hold out the last documents")
    elif e.every > 0:  # (the data config's own problems are reported by data_problems)
        out += [p for p in eval_data_problems(cfg.data) if p not in cfg.data.problems()]
        if not out and not cfg.data.problems() and cfg.trainer.seq_len >= 1 and cfg.trainer.global_batch_size >= 1:
            out += _eval_batch_problems(cfg)
    return out


def _eval_batch_problems(cfg: TrainConfig) -> list[str]:
    """One full eval batch in the validation data (else every rank fails at the first evaluation)."""
    try:
        return eval_batch_problems(cfg.data, cfg.trainer.batch_shape())
    except (ValueError, OSError):  # unreadable data: said by data_problems
        return []


def logging_problems(cfg: TrainConfig) -> list[str]:
    mode = cfg.logging.wandb.mode
    return [] if mode in WANDB_MODES else [f"logging.wandb.mode={mode!r} must be one of {WANDB_MODES}"]


NEW_RUN = "start a new run in another directory (hydra.run.dir=... or trainer.ckpt_dir=...)"


def resume_problems(cfg: TrainConfig, ckpt_dir: Path, world_size: int = 1) -> list[str]:
    """A checkpoint to resume from: readable, whole, of this model and this token store; on another
    layout, with the layout-independent state that conversion reads (the new layout's own checks are
    the model's)."""
    try:
        found = read_trainer_state(ckpt_dir)
    except CheckpointError as err:
        return [str(err)]
    if found is None or not cfg.trainer.resume:
        return history_problems(cfg, found and found[1], ckpt_dir)
    tag, state = found
    out = data_problems_on_resume(cfg, state, ckpt_dir / tag)
    same_layout = state.layout == cfg.parallel.layout_key()
    if same_layout:
        out += step_dir_problems(ckpt_dir, tag, world_size)
    else:
        broken = universal_file_problems(ckpt_dir, tag)
        if broken:
            return out + broken  # (the state's index would be read from the broken files)
    try:
        saved_model = UniversalState(ckpt_dir / tag).model_config
    except UniversalError as err:
        if same_layout:
            return out + config_change_problems(cfg, state.config, ckpt_dir / tag)  # the engine's files suffice
        hint = convertible_hint(ckpt_dir)
        return out + [f"the checkpoint {ckpt_dir / tag} was written with {state.layout}, this run is "
                      f"{cfg.parallel.layout_key()}, and it cannot be converted: {err}. Resume with the same "
                      f"layout ({state.layout}){hint}" + ("" if hint else f". {older_advice(ckpt_dir, tag)}")]
    theirs, ours = checkpoint_signature(saved_model), checkpoint_signature(cfg.model)
    shape_keys = {f"model.{k}" for k in theirs if theirs[k] != ours[k]}  # said below, with the checkpoint's shapes
    out += config_change_problems(cfg, state.config, ckpt_dir / tag, skip=shape_keys)
    return out + [f"model.{k}={ours[k]!r} differs from the checkpoint {ckpt_dir / tag} ({theirs[k]!r}): "
                  f"resume with the model it was written with, or {NEW_RUN}" for k in theirs if theirs[k] != ours[k]]


def data_problems_on_resume(cfg: TrainConfig, state: TrainerState, where: Path) -> list[str]:
    """The token store is the checkpoint's (a store that does not open is data_problems' to say)."""
    try:
        identity = store_identity(cfg.data)
    except (ValueError, OSError):
        return []
    return data_identity_problems(cfg, identity, state.data, where)


def convertible_hint(ckpt_dir: Path) -> str:
    """The kept checkpoints that carry the layout-independent state, as advice (empty: none)."""
    kept = sorted(p.name for p in ckpt_dir.glob("step_*") if (p / UNIVERSAL / META).is_file())
    if not kept:
        return ""
    return f", or write {kept[-1]} into {ckpt_dir / 'latest'} to resume from that older checkpoint, which has it"


def stage_check_problems(cfg: TrainConfig) -> list[str]:
    """What depends on the sequence length and batch (a stage's own, :mod:`megaring.train.stages`)."""
    return batch_problems(cfg) + dynamic_cp_problems(cfg) + model_problems(cfg) + data_problems(cfg) + \
        eval_problems(cfg)


def stages_problems(cfg: TrainConfig) -> list[str]:
    """``data.stages`` / ``trainer.tokens_per_step``, then every stage checked as a run of its own
    (its seq_len against the layout, its batch, its data): a problem of a later stage is found
    before the run starts, not when it gets there. Lines of ``data.stages[i]`` name the stage."""
    structure = structure_problems(cfg)
    if structure:
        return structure + stage_check_problems(cfg)
    stages, out, seen = build_stages(cfg), [], set()
    for stage in stages:
        for problem in stage_check_problems(_checked_config(stage)):
            if problem in seen:
                continue  # the same in every stage (a data.path that does not exist): once
            seen.add(problem)
            out.append(f"data.stages[{stage.index}] (seq_len {stage.seq_len}, global batch "
                       f"{stage.global_batch_size}): {problem}" if cfg.data.stages else problem)
    return out


def _checked_config(stage: Stage) -> TrainConfig:
    """The stage's config as the data checks read it: its steps and its sample-order seed."""
    t = stage.cfg.trainer
    return dataclasses.replace(stage.cfg, trainer=dataclasses.replace(t, max_steps=stage.steps,
                                                                      seed=stage_seed(t.seed, stage.index)))


def collect_problems(cfg: TrainConfig, world_size: int, ckpt_dir: Path | None = None) -> list[str]:
    out = finite_problems(cfg) + parallel_problems(cfg, world_size) + optim_problems(cfg)
    out += operations_problems(cfg) + stages_problems(cfg) + logging_problems(cfg)
    if ckpt_dir is not None:
        out += resume_problems(cfg, ckpt_dir, world_size)
    return out


def validate(cfg: TrainConfig, world_size: int, ckpt_dir: Path | None = None) -> None:
    problems = collect_problems(cfg, world_size, ckpt_dir)
    if problems:
        raise ConfigError.listing(problems)
