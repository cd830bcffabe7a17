"""``data.stages``: a run in stages, each with its own sequence length, source weights and RoPE.

ProLong's curriculum (64K, then 512K) and torchtitan's data stages, in one config::

    data:
      stages:
        - {steps: 600, seq_len: 65536, sources: {books: 0.3, code: 0.3, short: 0.4}}
        - {steps: 400, seq_len: 524288, rope_theta: 128000000.0, sources: {books: 0.5, short: 0.5}}

A stage is the run's config with a few values replaced (:func:`stage_config`): everything that
reads a config (the sample reader, the layout and batch checks, DeepSpeed's batch size, the
attention cp of ``parallel.dynamic_cp``, the model's RoPE) reads the stage's, so a stage is
checked and built exactly like a run of its own. What spans the stages: the model and its
optimizer state, the learning-rate schedule (over ``trainer.max_steps``, which the stages' steps
must add up to) and the step count. Each stage draws its own shuffled order of every source at
its own sequence length (seed :func:`stage_seed`), so which samples make up step ``s`` depends
only on (seed, stages, step), and a resume inside a stage continues it.

``trainer.tokens_per_step`` keeps tokens per step constant across stages: a stage's global
batch is ``tokens_per_step / seq_len`` (also without stages).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megaring.train.config import TrainConfig

STAGE_KEYS = ("steps", "seq_len", "global_batch_size", "sources", "rope_theta", "rope_scaling")


@dataclass(frozen=True)
class Stage:
    """Steps ``first..last`` (1-based, inclusive) of the run, trained with ``cfg``."""

    index: int
    first: int
    last: int
    cfg: TrainConfig  # the run's config with this stage's values (data.stages emptied)
    samples_before: int  # samples of the stages before this one
    tokens_before: int

    @property
    def global_batch_size(self) -> int:
        return self.cfg.trainer.global_batch_size

    @property
    def seq_len(self) -> int:
        return self.cfg.trainer.seq_len

    @property
    def steps(self) -> int:
        return self.last - self.first + 1

    def local_step(self, step: int) -> int:
        """The 0-based index of ``step`` inside this stage (what the stage's reader counts)."""
        return step - self.first

    def samples_after(self, step: int) -> int:
        """Samples of the run once ``step`` (of this stage) is done."""
        return self.samples_before + (step - self.first + 1) * self.global_batch_size

    def tokens_after(self, step: int) -> int:
        return self.tokens_before + (step - self.first + 1) * self.global_batch_size * self.seq_len

    def describe(self) -> str:
        t = self.cfg.trainer
        return f"stage {self.index} (steps {self.first}-{self.last}, seq_len {t.seq_len}, global batch " \
               f"{t.global_batch_size})"


def stage_seed(seed: int, index: int) -> int:
    """The sample-order seed of stage ``index``: the run's seed for the first stage (a run of one
    stage reads what a run without stages reads), a distinct one for every later stage."""
    return seed if index == 0 else seed + 1_000_003 * index


def raw_stages(cfg: TrainConfig) -> list[dict[str, Any]]:
    """``data.stages`` as given; without stages, the whole run as one stage of the trainer's values."""
    if cfg.data.stages:
        return [dict(s) if isinstance(s, dict) else s for s in cfg.data.stages]
    return [{"steps": cfg.trainer.max_steps}]


def structure_problems(cfg: TrainConfig) -> list[str]:
    """Every problem of ``data.stages`` and ``trainer.tokens_per_step`` that needs no stage config."""
    t, out = cfg.trainer, []
    if not isinstance(t.tokens_per_step, int) or t.tokens_per_step < 0:
        out.append(f"trainer.tokens_per_step={t.tokens_per_step} must be an integer >= 0 (0: "
                   "trainer.global_batch_size samples per step)")
    stages = cfg.data.stages
    if not stages:
        return out + _tokens_problems(cfg, t.seq_len, "trainer.seq_len")
    if not isinstance(stages, list):
        return out + [f"data.stages must be a list of {{steps: N, seq_len: L, ...}}, got {stages!r}"]
    total = 0
    for i, stage in enumerate(stages):
        where = f"data.stages[{i}]"
        if not isinstance(stage, dict):
            out.append(f"{where} must be a mapping {{steps: N, seq_len: L, sources: {{...}}}}, got {stage!r}")
            continue
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            out.append(f"{where}: unknown keys {unknown}; a stage takes {list(STAGE_KEYS)}")
        steps = stage.get("steps")
        if not _positive_int(steps):
            out.append(f"{where}.steps must be an integer >= 1, got {steps!r}")
        else:
            total += steps
        for key in ("seq_len", "global_batch_size"):
            if key in stage and not _positive_int(stage[key]):
                out.append(f"{where}.{key} must be an integer >= 1, got {stage[key]!r}")
        if "global_batch_size" in stage and t.tokens_per_step:
            out.append(f"{where}.global_batch_size: with trainer.tokens_per_step={t.tokens_per_step} the global "
                       "batch is tokens_per_step / seq_len; give one or the other")
        if _positive_int(stage.get("seq_len", t.seq_len)):
            out += _tokens_problems(cfg, stage.get("seq_len", t.seq_len), f"{where}.seq_len")
        out += _source_weight_problems(cfg, stage.get("sources"), where)
        theta = stage.get("rope_theta")
        if theta is not None and (not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0):
            out.append(f"{where}.rope_theta must be a positive number, got {theta!r}")
        scaling = stage.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            out.append(f"{where}.rope_scaling must be a mapping {{rope_type: ..., factor: ...}} or null, "
                       f"got {scaling!r}")
    if not out and total != t.max_steps:
        out.append(f"the steps of data.stages add up to {total}, not trainer.max_steps={t.max_steps}: make them "
                   f"equal (the learning-rate schedule spans every stage)")
    return out


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _tokens_problems(cfg: TrainConfig, seq_len: int, where: str) -> list[str]:
    tokens = cfg.trainer.tokens_per_step
    if isinstance(tokens, int) and tokens > 0 and tokens % seq_len:
        return [f"trainer.tokens_per_step={tokens} is not a multiple of {where}={seq_len}: the global batch "
                f"would not be a whole number of samples"]
    return []


def _source_weight_problems(cfg: TrainConfig, weights, where: str) -> list[str]:
    if weights is None:
        return []
    if cfg.data.kind != "mixture":
        return [f"{where}.sources: stage weights need data.kind=mixture (data.kind={cfg.data.kind!r})"]
    if not isinstance(weights, dict) or not weights:
        return [f"{where}.sources must be a mapping {{<source>: <weight>}}, got {weights!r}"]
    out = []
    names = set(cfg.data.sources) if isinstance(cfg.data.sources, dict) else set()
    for name, w in weights.items():
        if name not in names:
            out.append(f"{where}.sources.{name}: not a source of data.sources ({sorted(names)})")
        w = _weight(w)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            out.append(f"{where}.sources.{name} must be a weight >= 0 (0: not read in this stage), got {w!r}")
    return out


def _weight(value):
    """A stage's weight of a source: a number, or ``{weight: number}``."""
    return value.get("weight") if isinstance(value, dict) else value


def stage_config(cfg: TrainConfig, stage: dict[str, Any]) -> TrainConfig:
    """``cfg`` with ``stage``'s values: ``trainer.seq_len``, the global batch, the mixture's weights
    (a weight of 0 leaves the source out of the stage) and ``model.rope_theta`` / ``rope_scaling``."""
    t = cfg.trainer
    seq_len = stage.get("seq_len", t.seq_len)
    batch = t.tokens_per_step // seq_len if t.tokens_per_step else stage.get("global_batch_size", t.global_batch_size)
    trainer = dataclasses.replace(t, seq_len=seq_len, global_batch_size=batch)
    data = dataclasses.replace(cfg.data, stages=[], sources=_stage_sources(cfg.data.sources, stage.get("sources")))
    model = cfg.model
    if "rope_theta" in stage:
        model = dataclasses.replace(model, rope_theta=float(stage["rope_theta"]))
    if "rope_scaling" in stage:
        model = dataclasses.replace(model, rope_scaling=dict(stage["rope_scaling"]) if stage["rope_scaling"] else None)
    return dataclasses.replace(cfg, trainer=trainer, data=data, model=model)


def _stage_sources(sources: dict, weights: dict | None) -> dict:
    if not weights:
        return sources
    out = {}
    for name, spec in sources.items():
        w = _weight(weights.get(name, spec.get("weight")))
        if w:
            out[name] = {**spec, "weight": w}
    return out


def build_stages(cfg: TrainConfig) -> list[Stage]:
    """The run's stages in order (one, with the trainer's values, when ``data.stages`` is empty).
    The config must be valid (:func:`structure_problems` empty)."""
    out, first, samples, tokens = [], 1, 0, 0
    for i, raw in enumerate(raw_stages(cfg)):
        scfg = stage_config(cfg, raw)
        stage = Stage(i, first, first + raw["steps"] - 1, scfg, samples, tokens)
        out.append(stage)
        first = stage.last + 1
        samples += raw["steps"] * stage.global_batch_size
        tokens += raw["steps"] * stage.global_batch_size * stage.seq_len
    return out


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that trains ``step`` (1-based); the last one past the end (nothing left to train)."""
    for stage in stages:
        if step <= stage.last:
            return stage
    return stages[-1]
