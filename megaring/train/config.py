"""The training config: dataclasses are the schema, Hydra YAML under ``megaring/configs/`` composes them.

``TrainConfig`` is registered in Hydra's ConfigStore as ``base_config``; ``megaring/configs/config.yaml``
lists it first in its defaults, so every group file (``model/``, ``parallel/``, ``data/``,
``optim/``, ``trainer/``, ``logging/``) is type-checked against these classes. The entry point
converts the composed config once (:func:`to_train_config`); everything below it takes the typed
sub-config it needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megaring.data import BatchShape, DataConfig
from megaring.distributed.mesh import ParallelDims
from megaring.errors import ConfigError, closest_name
from megaring.layout import dynamic_cp_size
from megaring.model import ModelConfig
from megaring.ring.settings import RingSettings

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16")
WANDB_MODES = ("offline", "online", "disabled")


# ``parallel.ring_settings``: the fields of :class:`~megaring.ring.RingSettings`, mutable for Hydra's
# overrides; converted once into the frozen settings (:meth:`ParallelConfig.ring`).
RingSettingsConfig = dataclasses.make_dataclass(
    "RingSettingsConfig", [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(RingSettings)])
RingSettingsConfig.__module__ = __name__  # picklable: spawned workers receive the config


@dataclass
class ParallelConfig:
    """The mesh ``dp x cp x tp`` (tp innermost; cp = ring x ulysses, ulysses innermost) and how the
    processes are started."""

    dp: int = 1
    cp: int = 1
    tp: int = 1
    ulysses: int = 1  # Ulysses (head all-to-all) group inside cp: cp = ulysses * ring; 1: pure ring, cp: pure Ulysses
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3 over dp x cp
    sequence_parallel: bool = False  # Megatron sequence parallelism inside the tp group
    layout: str = "zigzag"  # how cp ranks hold the sequence: "zigzag" | "contiguous" | "balanced" (by documents)
    # Without a launcher: spawn this many local workers (0: don't; "auto": dp * cp * tp, for sweeps over layouts).
    nproc_per_node: int | str = 0
    attn_kernel: str | None = None  # None: automatic; else a name from megaring.kernels
    ring_backward: str = "whole"  # ring attention's backward: "whole" (fastest) | "chunked" (least memory)
    ring_settings: RingSettingsConfig = field(default_factory=RingSettingsConfig)  # tile and chunk sizes
    # Attention on the smallest cp' dividing cp that holds a sample within dynamic_cp_tokens per rank;
    # the cp / cp' groups of a dp rank take different micro-batches (megaring.layout.dynamic_cp_size).
    dynamic_cp: bool = False
    dynamic_cp_tokens: int = 0  # tokens per rank; 0: trainer.seq_len / cp
    timeout_s: float = 600.0  # bound on every collective: a dead rank ends the job
    # The network interface of gloo / NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); None: the one the
    # kernel routes MASTER_ADDR through. Variables exported by the user win.
    net_iface: str | None = None
    backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    # Extra DeepSpeed config merged into the generated one (e.g. ZeRO bucket sizes). Keys the
    # trainer owns (batch sizes, gradient_clipping, precision, zero stage) are rejected.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # Run with a DeepSpeed outside the tested range (megaring.engine.deepspeed_internals.TESTED_RANGE).
    allow_untested_deepspeed: bool = False

    def dims(self) -> ParallelDims:
        return ParallelDims(self.dp, self.cp, self.tp, self.ulysses)

    def ring(self) -> RingSettings:
        return RingSettings(**asdict(self.ring_settings))

    def attention_cp(self, seq_len: int, micro_batches: int) -> int:
        """The size of the cp groups attention runs on: ``cp``, or with ``dynamic_cp`` the smallest
        cp' that holds a sample of ``seq_len`` (``micro_batches``: per dp rank and step)."""
        if not self.dynamic_cp or self.cp == 1:
            return self.cp
        tokens = self.dynamic_cp_tokens or seq_len // self.cp
        return dynamic_cp_size(self.cp, seq_len, tokens, micro_batches)

    def layout_key(self) -> dict[str, int]:
        """What a checkpoint records of the layout it was written at."""
        return {"dp": self.dp, "cp": self.cp, "tp": self.tp, "zero_stage": self.zero_stage}

    def local_workers(self) -> int:
        """How many workers ``nproc_per_node`` asks for ("auto": the whole mesh)."""
        if self.nproc_per_node == "auto":
            return self.dp * self.cp * self.tp
        if isinstance(self.nproc_per_node, int) and self.nproc_per_node >= 0:
            return self.nproc_per_node
        raise ValueError(f"parallel.nproc_per_node={self.nproc_per_node!r}: give an integer >= 0 "
                         "or 'auto' (dp * cp * tp local workers)")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then cosine / linear decay to ``min_lr_ratio * lr`` (or constant)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None  # None: trainer.max_steps
    grad_clip: float = 1.0  # max global gradient norm; 0 = off


@dataclass
class TrainerConfig:
    seq_len: int = 128
    global_batch_size: int = 8  # samples per optimizer step, over dp (cp ranks share samples)
    # > 0: the global batch is tokens_per_step / seq_len (constant tokens across data.stages)
    tokens_per_step: int = 0
    micro_batch_size: int = 1  # samples per forward on one rank
    max_steps: int = 100
    seed: int = 1234
    checkpoint_every: int = 0  # steps between checkpoints; 0: only the final one
    keep_last: int = 2  # checkpoints kept on disk
    # Steps between checkpoints that carry universal/ (resume on another layout, megaring-export);
    # None: every checkpoint; 0: none (DeepSpeed's own files only: same-layout resume).
    universal_every: int | None = None
    ckpt_dir: str | None = None  # None: <run dir>/checkpoints
    resume: bool = True  # continue from the latest checkpoint in ckpt_dir when there is one
    log_every: int = 1
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    profile_steps: list[int] | None = None  # [first, last]: torch.profiler trace into <run dir>/profile
    # Operations under failure (docs/training.md, "When things go wrong").
    preempt_exit_code: int = 0  # exit status after a signal (SIGTERM/SIGUSR1/SIGINT) and a clean save
    preempt_grace_s: float = 120.0  # no step boundary this long after the signal: exit without a checkpoint
    max_bad_steps: int = 5  # consecutive non-finite steps skipped before the run stops (exit 3)
    loss_spike_factor: float = 3.0  # loss above this times the running median: a loss_spike record; 0: off
    resume_allow_changes: list[str] = field(default_factory=list)  # keys that may differ from the checkpoint's

    def batch_shape(self) -> BatchShape:
        return BatchShape(self.seq_len, self.global_batch_size, self.micro_batch_size)

    def universal_at(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` carries the layout-independent state (``universal_every``)."""
        every = self.universal_every
        return every is None or (every > 0 and step % every == 0)


@dataclass
class EvalConfig:
    """Evaluation on the validation data (``data.valid_path`` or ``data.valid_fraction``)."""

    every: int = 0  # steps between evaluations (and at the final step); 0: off
    batches: int = 0  # eval batches of trainer.global_batch_size samples per evaluation; 0: the whole split
    # Tasks beside the loss: "position_loss" (mean loss per position bucket, eval/position_loss/<a>-<b>),
    # "passkey" and "needle" (retrieval score per length and depth, eval/<task>/<length>/<depth>)
    tasks: list[str] = field(default_factory=list)


@dataclass
class PositionLossConfig:
    buckets: list[int] | None = None  # bucket edges from 0 (the last bucket ends at seq_len); None: powers of two


@dataclass
class PasskeyConfig:
    """``passkey``: a seeded random number hidden at each depth of filler text (megaring.retrieval.cases)."""

    lengths: list[int] | None = None  # case lengths in tokens; None: [trainer.seq_len]
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # fractions of the context
    samples: int = 2  # cases per (length, depth), each with its own key
    seed: int = 0  # the keys' seed (the same cases at every layout and run)
    batch_size: int = 1  # cases per forward pass on each data-parallel rank
    chat: bool = False  # the question as the user message of the checkpoint's chat template
    save_cases: bool = False  # write every case's ids and score to <run dir>/cases/passkey.jsonl
    key_digits: int = 5


@dataclass
class NeedleConfig(PasskeyConfig):
    """``needle``: a fact inside the text of data.path, among ``distractors`` others of its form."""

    distractors: int = 2


@dataclass
class EvalTasksConfig:
    """Settings of each task of ``eval.tasks``."""

    position_loss: PositionLossConfig = field(default_factory=PositionLossConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    needle: NeedleConfig = field(default_factory=NeedleConfig)


@dataclass
class WandbConfig:
    mode: str = "offline"  # "offline" (no key needed) | "online" | "disabled"
    project: str = "megaring"
    entity: str | None = None
    group: str | None = None  # None: a hash of the config without parallel/logging (one per sweep)
    tags: list[str] = field(default_factory=list)  # the layout tags are always added
    name: str | None = None  # None: the run directory's name
    dir: str | None = None  # None: the run directory


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    metrics_file: str = "metrics.jsonl"  # relative to the run directory
    peak_tflops: float | None = None  # per-device peak for MFU; None: looked up from the device name


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_tasks: EvalTasksConfig = field(default_factory=EvalTasksConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def attention_cp(self) -> int:
        """The cp group size attention runs on (``parallel.dynamic_cp``; else ``parallel.cp``)."""
        t, p = self.trainer, self.parallel
        micro_batches = t.global_batch_size // max(1, t.micro_batch_size * p.dp)
        return p.attention_cp(t.seq_len, micro_batches)


# Every key of a composed config is a field of the schema above, except below these free-form
# mappings, whose keys are the user's (anything else is a ConfigError naming the closest key).
# A path without a field yet is reserved: accepted, and left out of TrainConfig until a feature reads it.
FREE_FORM_KEYS = {
    "parallel.deepspeed": "extra DeepSpeed config merged into the generated one",
    "model.rope_scaling": "RoPE parameters as in a transformers config: {rope_type: ..., <parameters>}",
    "data.sources": "named data sources of a mixture, {<name>: {path: ..., weight: ...}}",
}
# Config groups (configs/<group>/*.yaml): ``model=125m`` selects a file, it is not a key.
CONFIG_GROUPS = ("model", "parallel", "data", "optim", "trainer", "eval", "logging")


def schema_node() -> DictConfig:
    """``TrainConfig`` as the node Hydra composes onto. ``model.rope_scaling`` is an empty mapping
    there (plain RoPE, converted back to ``None``), since omegaconf cannot merge a mapping given on
    the command line into a ``None`` one; the free-form mappings take new keys without ``+``."""
    node = OmegaConf.structured(TrainConfig)
    node.model.rope_scaling = {}
    for key in FREE_FORM_KEYS:
        child = OmegaConf.select(node, key)
        if isinstance(child, DictConfig):
            OmegaConf.set_struct(child, False)
    return node


def register_configs() -> None:
    """Make ``base_config`` (the schema), the run-name resolver and, with the ``slurm`` extra, the
    slurm launcher's schema and job-size resolvers known to Hydra."""
    ConfigStore.instance().store(name="base_config", node=schema_node())
    if not OmegaConf.has_resolver("megaring_run_name"):
        OmegaConf.register_new_resolver("megaring_run_name", run_name)
    try:
        from megaring.ops.slurm_launcher import register_launcher
    except ImportError:  # hydra-submitit-launcher not installed: no hydra/launcher=slurm
        return
    register_launcher()


# Settings that do not change what a run computes: re-running a command with other values of these
# resumes the same run directory, and runs that differ only in them share a wandb group.
RUN_NEUTRAL_KEYS = (
    "trainer.max_steps", "trainer.resume", "trainer.profile_steps", "trainer.log_every", "trainer.checkpoint_every",
    "trainer.keep_last", "trainer.preempt_exit_code", "trainer.preempt_grace_s", "trainer.max_bad_steps",
    "trainer.loss_spike_factor", "trainer.resume_allow_changes", "trainer.universal_every",
    "model.allow_unused_weights", "parallel.nproc_per_node", "parallel.timeout_s", "parallel.backend",
    "parallel.allow_untested_deepspeed", "parallel.net_iface",
    "logging.wandb.mode", "logging.wandb.tags", "logging.progress_bar", "hydra/launcher",
)


def run_name(overrides) -> str:
    """A directory name for a run from its command-line overrides (``default`` without any).

    ``overrides``: Hydra's list of the job's overrides (``${hydra:overrides.task}``), or an
    already joined string. Overrides of :data:`RUN_NEUTRAL_KEYS` and ``hydra.*`` are left out, so
    the same command gives the same run directory and re-running it resumes from its checkpoints.
    Names too long for a file system keep a readable prefix and a hash of the rest.
    """
    if not isinstance(overrides, str):
        kept = [o for o in overrides if _override_key(o) not in RUN_NEUTRAL_KEYS
                and not _override_key(o).startswith("hydra.")]
        overrides = ",".join(sorted(kept))
    name = overrides.replace("/", "_") or "default"
    if len(name) > 200:
        name = name[:180] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _free_form(path: str) -> bool:
    return any(path == k or path.startswith(k + ".") for k in FREE_FORM_KEYS)


def _schema_keys(node: DictConfig, prefix: str = "") -> dict[str, DictConfig | None]:
    """Every key path of the schema: a section's node (a dataclass), ``None`` for a value."""
    out = {}
    for key in node:
        path, child = f"{prefix}{key}", node._get_node(key)
        section = isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child))
        out[path] = child if section and not _free_form(path) else None
        if out[path] is not None:
            out |= _schema_keys(child, f"{path}.")
    return out


def _unknown_key(path: str, known: dict) -> str:
    values = {k for k, v in known.items() if v is None} | set(FREE_FORM_KEYS)
    return (f"{path} is not a config key: did you mean {closest_name(path, values)}? "
            "(docs/training.md, \"Config errors\")")


def unknown_key_problems(cfg: DictConfig) -> list[str]:
    """One line per key of the composed ``cfg`` that the schema does not have (``+`` overrides
    included, which Hydra adds without a check), naming the closest known key."""
    known, out = _schema_keys(schema_node()), []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            path = f"{prefix}{key}"
            if _free_form(path) or path == "hydra":
                continue
            if path not in known:
                out.append(_unknown_key(path, known))
            elif known[path] is not None and isinstance(node._get_node(key), DictConfig):
                walk(node._get_node(key), f"{path}.")

    walk(cfg, "")
    return out


def command_line_problems(args: Sequence[str]) -> list[str]:
    """One line per command-line override whose key the schema does not have, with or without
    ``+`` (checked before Hydra composes: its own error for an unknown key suggests the ``+`` that
    would add it unchecked), or whose value its field cannot hold. Options (``-m``, ``--cfg job``),
    sweeps and what Hydra cannot parse are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, schema, out = OverridesParser.create(), schema_node(), []
    known = _schema_keys(schema)
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue
        path = override.key_or_group
        if override.package is not None or "/" in path or path.split(".")[0] == "hydra" or path in CONFIG_GROUPS:
            continue  # a config group choice or Hydra's own settings
        problem = _path_problem(path, known)
        a_field = path in known and known[path] is None  # a value of the schema, not a section
        if problem is None and a_field and not (override.is_delete() or override.is_sweep_override()):
            problem = _value_problem(schema, path, override.value())
        if problem:
            out.append(problem)
    return out


def _value_problem(schema: DictConfig, path: str, value: Any) -> str | None:
    """Why the schema's field ``path`` cannot hold ``value`` (``parallel.dp=two``), in one line."""
    from omegaconf.errors import ValidationError

    try:
        OmegaConf.update(schema, path, value, merge=True)
    except ValidationError as err:
        return f"{path}={value!r}: {str(err).splitlines()[0]}"
    return None


def _path_problem(path: str, known: dict[str, DictConfig | None]) -> str | None:
    """Why ``path`` is not a key of the schema (``None``: it is, or it lies in a free-form mapping)."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if _free_form(prefix):
            return None
        if prefix not in known:
            return _unknown_key(prefix, known)
        if known[prefix] is None and i < len(parts):
            return f"{path}: {prefix} is a value, not a section: set {prefix}=<value>"
    return None


def _drop_reserved(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the free-form keys that have no field yet (:data:`FREE_FORM_KEYS`)."""
    known = _schema_keys(schema_node())
    reserved = [k for k in FREE_FORM_KEYS if k not in known and OmegaConf.select(cfg, k) is not None]
    if not reserved:
        return cfg
    plain = OmegaConf.to_container(cfg)  # interpolations kept, resolved by the conversion
    for key in reserved:
        parent, _, leaf = key.rpartition(".")
        node = plain
        for part in parent.split("."):
            node = node[part]
        node.pop(leaf)
    return OmegaConf.create(plain)


def to_train_config(cfg: DictConfig | TrainConfig, overrides: Sequence[str] = ()) -> TrainConfig:
    """The composed Hydra config as typed dataclasses (resolves interpolations), converted once.

    A key the schema does not have is a :class:`~megaring.errors.ConfigError` (all of them in one).
    With ``model.init_from`` the model is the checkpoint's (its ``config.json``), and the ``model.*``
    keys among the command line's ``overrides`` apply on top of it; one that changes the
    checkpoint's shapes is a :class:`~megaring.errors.ConfigError`.
    """
    if not isinstance(cfg, TrainConfig):
        if "hydra" in cfg:
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        unknown = unknown_key_problems(cfg)
        if unknown:
            raise ConfigError.listing(unknown)
        cfg = OmegaConf.to_object(OmegaConf.merge(schema_node(), _drop_reserved(cfg)))
        if cfg.model.rope_scaling == {}:
            cfg.model.rope_scaling = None  # plain RoPE (see schema_node)
    if cfg.model.init_from:
        cfg.model = pretrained_model_config(cfg.model, overrides)
    return cfg


def pretrained_model_config(model: ModelConfig, overrides: Sequence[str], base: ModelConfig | None = None
                            ) -> ModelConfig:
    """The model of ``model.init_from`` (or ``base``, a training checkpoint's) with the command line's
    other ``model.*`` values on top."""
    from megaring.hf import model_config_from_hf, override_problems  # reads config.json only

    named = {_override_key(o).removeprefix("model.") for o in overrides if _override_key(o).startswith("model.")}
    named.discard("init_from")
    try:
        checkpoint = base if base is not None else model_config_from_hf(model.init_from)
    except (ValueError, OSError) as err:
        nested = str(err).replace("\n  - ", "\n      - ")  # its own list, under this problem
        raise ConfigError.listing([f"model.init_from={model.init_from}: {nested}"]) from None
    given = {k: getattr(model, k) for k in named if hasattr(model, k)}
    parts = {k.split(".", 1)[1] for k in named if k.startswith("rope_scaling.")}
    if parts and "rope_scaling" not in given:  # model.rope_scaling.factor=32: the checkpoint's, one key changed
        given["rope_scaling"] = {**(checkpoint.rope_scaling or {}), **{k: model.rope_scaling[k] for k in parts}}
    problems = override_problems(checkpoint, given)
    if problems:
        raise ConfigError.listing(problems)
    return dataclasses.replace(checkpoint, **given, init_from=model.init_from if base is None else None)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def experiment_id(cfg: TrainConfig) -> str:
    """A short hash of everything but the layout and logging: runs of one sweep over layouts share it."""
    d = config_dict(cfg)
    for key in ("parallel", "logging"):
        d.pop(key)
    d["trainer"].pop("ckpt_dir")
    for key in RUN_NEUTRAL_KEYS:
        if key.startswith("trainer."):
            d["trainer"].pop(key.split(".", 1)[1])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
