"""The trainer's view of the data: per-(dp, cp) rank micro-batches of pre-sharded samples.

Sample order (a pure function of seed, global batch size G and step, independent of the mesh):
step ``s`` consumes sample ordinals ``[s*G, (s+1)*G)`` of the shuffled order
(:mod:`megaring.data.sample_index`); dp rank ``r`` takes the ``G/dp`` ordinals starting at
``s*G + r*G/dp`` and cuts them into micro-batches of ``micro_batch_size`` in order. So the
global position ``r*G/dp + m*mb + row`` of a step always holds the same sample, whatever dp,
cp and tp are, and the data state is just the number of consumed samples ``s*G``. With
``data.balance=work`` the same ``G`` ordinals are dealt to dp ranks and micro-batches by their
attention cost instead (:mod:`megaring.data.balance`): the step's set of samples is unchanged.

Sharding: a sample is ``L + 1`` tokens from ``start_token``; for each of this cp rank's ranges
``[a, b)`` (:func:`megaring.layout.shard_ranges`) the reader copies tokens
``[start + a, start + b + 1)`` out of the memory map, so labels (the next token) are right at
chunk edges and only ``O(L / cp)`` token bytes are read per sample. A store with a loss mask
(``tokens.mask``) is read with the same per-range reads: a label whose token is untrained
becomes ``IGNORE_INDEX``. With the balanced layout the
ranges depend on the sample's documents: they come from the document offsets the sample index
points at (:func:`sample_doc_lengths`), the same plan ring attention sees in the segment ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from megaring.data.balance import StepPlan, plan_step, sample_cost
from megaring.data.config import DataConfig
from megaring.data.dataset import open_dataset
from megaring.data.mixture import LengthFilter, Mixture, MixtureSchedule, SourceSpec, source_specs
from megaring.data.mock import MockSource
from megaring.data.sample_index import SampleIndex, load_sample_index, split_documents
from megaring.data.store import StoreError
from megaring.errors import problem_list
from megaring.layout import balanced_ranges, shard_ranges

FIELDS = ("tokens", "labels", "positions", "segment_ids")
# The label of an untrained token: megaring.tensor_parallel.cross_entropy.IGNORE_INDEX (and transformers'
# -100), repeated here so that tokenising and reading data import none of the distributed code.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DataInfo:
    """What the trainer checks before any collective (see :mod:`megaring.data.checks`)."""

    kind: str
    vocab_size: int
    eod_id: int
    num_documents: int
    num_tokens: int
    bos_id: int | None = None  # the id starting every document; None: documents start without one
    path: str | None = None  # the store directory (kind=files)
    tokenizer_sha256: str | None = None  # of the model file, tokenizer_files[0]
    tokenizer_files: tuple[str, ...] = ()  # paths to copy into an exported model


def read_shard(source, start_doc: int, start_token: int, ranges: list[tuple[int, int]],
               reset_positions: bool = True) -> dict[str, np.ndarray]:
    """One sample's shard: each field (sum of range lengths,) int64, ranges in local order.

    ``segment_ids`` number documents from 0 at the sample's first document; ``positions``
    restart at each document start and at the sample start (or run ``a..b`` across the
    sample when ``reset_positions`` is False).
    """
    parts = [_read_range(source, start_doc, start_token, a, b, reset_positions) for a, b in ranges]
    return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}


def _read_range(source, start_doc: int, t0: int, a: int, b: int, reset: bool) -> dict[str, np.ndarray]:
    """Fields of sample positions ``[a, b)`` of the sample starting at token ``t0``."""
    window = source.read(t0 + a, t0 + b + 1).astype(np.int64)  # (b - a + 1,): tokens and the next one
    doc_starts = source.doc_starts
    lo = int(np.searchsorted(doc_starts, t0 + a, side="right")) - 1  # document holding position a
    hi = int(np.searchsorted(doc_starts, t0 + b, side="left"))  # documents [lo, hi) overlap [a, b)
    starts = np.asarray(doc_starts[lo:hi], dtype=np.int64)  # (hi - lo,)
    edges = np.append(np.maximum(starts, t0 + a), t0 + b)  # (hi - lo + 1,)
    counts = np.diff(edges)  # (hi - lo,) positions of each document in [a, b)
    segment_ids = np.repeat(np.arange(lo, hi, dtype=np.int64) - start_doc, counts)  # (b - a,)
    if reset:
        positions = np.arange(t0 + a, t0 + b, dtype=np.int64) - np.repeat(np.maximum(starts, t0), counts)
    else:
        positions = np.arange(a, b, dtype=np.int64)
    labels = window[1:]
    read_mask = getattr(source, "read_mask", None)  # the mock source has no mask
    trained = read_mask(t0 + a + 1, t0 + b + 1) if read_mask is not None else None  # (b - a,) of the labels
    if trained is not None:
        labels = np.where(trained, labels, IGNORE_INDEX)
    return {"tokens": window[:-1], "labels": labels, "positions": positions, "segment_ids": segment_ids}


def sample_doc_lengths(doc_starts, start_token: int, seq_len: int) -> tuple[int, ...]:
    """Lengths of the documents (pieces) making the sample of ``seq_len`` tokens at ``start_token``."""
    lo = int(np.searchsorted(doc_starts, start_token, side="right"))
    hi = int(np.searchsorted(doc_starts, start_token + seq_len, side="left"))
    edges = [start_token, *(int(x) for x in doc_starts[lo:hi]), start_token + seq_len]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]) if b > a)


@dataclass(frozen=True)
class BatchShape:
    """Tokens per sample, samples per step (over dp) and samples per forward on one rank."""

    seq_len: int
    global_batch_size: int
    micro_batch_size: int


@dataclass(frozen=True)
class RankShard:
    """Which part of each batch a rank reads: its dp slice of the samples, its cp shard of each.

    ``cp_groups > 1`` (``parallel.dynamic_cp``): the dp rank's cp ranks form ``cp_groups`` groups
    of ``cp_size`` ranks; group ``cp_group`` takes every ``cp_groups``-th of the dp rank's
    micro-batches (from the ``cp_group``-th), and ``cp_rank`` is this rank's place in its group.
    """

    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    layout: str = "zigzag"
    cp_groups: int = 1
    cp_group: int = 0


class BatchReader:
    """Micro-batches of this (dp rank, cp rank) for any step; see the module docstring for the order."""

    def __init__(self, source, index: SampleIndex, shape: BatchShape, shard: RankShard,
                 *, reset_positions: bool = True, balance: str = "none", window: int | None = None,
                 mixture: Mixture | None = None):
        if shape.global_batch_size % (shape.micro_batch_size * shard.dp_size):
            raise ValueError(f"global_batch_size {shape.global_batch_size} must be divisible by "
                             f"micro_batch_size * dp = {shape.micro_batch_size} * {shard.dp_size}")
        if not 0 <= shard.dp_rank < shard.dp_size:
            raise ValueError(f"dp_rank {shard.dp_rank} is outside a dp group of size {shard.dp_size}")
        per_rank = shape.global_batch_size // (shape.micro_batch_size * shard.dp_size)
        if per_rank % shard.cp_groups or not 0 <= shard.cp_group < shard.cp_groups:
            raise ValueError(f"{per_rank} micro-batches per dp rank cannot be shared by {shard.cp_groups} cp groups "
                             f"(cp group {shard.cp_group})")
        self.source, self.index = source, index
        self.seq_len, self.global_batch_size = shape.seq_len, shape.global_batch_size
        self.micro_batch_size = shape.micro_batch_size
        self.dp_rank, self.dp_size = shard.dp_rank, shard.dp_size
        self.shard = shard
        self.ranges = None if shard.layout == "balanced" else shard_ranges(shape.seq_len, shard.cp_rank,
                                                                            shard.cp_size, shard.layout)
        self.reset_positions = reset_positions
        self.balance, self.window = balance, window  # data.balance; the attention window its costs use
        self._plan: tuple[int, StepPlan] | None = None  # the last step's plan, by consumed samples
        self.mixture = mixture  # data.kind=mixture: ordinals map to (source, its ordinal); source/index: the first

    @property
    def vocab_size(self) -> int:
        return self.source.vocab_size

    @property
    def eod_id(self) -> int:
        return self.source.eod_id

    @property
    def num_samples(self) -> int:
        """Samples per epoch."""
        return self.index.num_samples

    @property
    def num_micro_batches(self) -> int:
        """This rank's micro-batches per step (its cp group's share with ``parallel.dynamic_cp``)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size * self.shard.cp_groups)

    def consumed_samples(self, step: int) -> int:
        """The data state after ``step`` steps."""
        return step * self.global_batch_size

    def sample_ordinals(self, consumed_samples: int) -> np.ndarray:
        """(num_micro_batches, micro_batch_size) ordinals this rank reads next: its dp rank's
        (``data.balance``), and of those its cp group's share (``RankShard.cp_groups``)."""
        if self.balance == "none":  # no costs needed: consecutive ordinals per rank
            per_rank = self.global_batch_size // self.dp_size
            first = consumed_samples + self.dp_rank * per_rank
            mine = np.arange(first, first + per_rank, dtype=np.int64).reshape(-1, self.micro_batch_size)
        else:
            mine = consumed_samples + self.step_plan(consumed_samples).slots[self.dp_rank]
        groups = self.shard.cp_groups
        return mine.reshape(-1, groups, self.micro_batch_size)[:, self.shard.cp_group]

    def step_plan(self, consumed_samples: int) -> StepPlan:
        """The :class:`~megaring.data.balance.StepPlan` of the step after ``consumed_samples``: every
        dp rank's samples and their attention costs (the same on every rank, no communication)."""
        if self._plan is None or self._plan[0] != consumed_samples:
            ordinals = range(consumed_samples, consumed_samples + self.global_batch_size)
            costs = np.array([self.sample_cost(k) for k in ordinals], dtype=np.int64)  # (G,)
            self._plan = consumed_samples, plan_step(self.balance, costs, self.dp_size, self.micro_batch_size)
        return self._plan[1]

    def locate(self, ordinal: int) -> tuple[object, int, int]:
        """``(source, start_doc, start_token)`` of the ``ordinal``-th sample consumed."""
        if self.mixture is None:
            return self.source, *self.index.locate(ordinal)
        return self.mixture.locate(ordinal)[1:]

    def sample_cost(self, ordinal: int) -> int:
        """Visible causal query-key pairs of the ``ordinal``-th sample (:func:`~megaring.data.balance.sample_cost`)."""
        source, _, start_token = self.locate(ordinal)
        pieces = sample_doc_lengths(source.doc_starts, start_token, self.seq_len) if self.reset_positions else (
            self.seq_len,)
        return sample_cost(pieces, self.window)

    def read_sample(self, ordinal: int) -> dict[str, np.ndarray]:
        """This cp rank's shard of the ``ordinal``-th sample: fields (seq_len / cp,) int64."""
        source, start_doc, start_token = self.locate(ordinal)
        ranges = self.ranges
        if ranges is None:  # balanced: the plan of this sample's documents
            lengths = sample_doc_lengths(source.doc_starts, start_token, self.seq_len)
            ranges = balanced_ranges(lengths, self.shard.cp_size)[self.shard.cp_rank]
        sample = read_shard(source, start_doc, start_token, ranges, self.reset_positions)
        top = max(int(sample["tokens"].max()), int(sample["labels"].max()))  # a cheap check (IGNORE_INDEX < 0)
        if top >= self.vocab_size:
            where = getattr(source, "path", "the data source")
            raise StoreError(f"{where}: sample {ordinal} (from token {start_token}) holds token id {top}, outside the "
                             f"vocabulary of {self.vocab_size}: tokens.bin was changed after preprocessing; "
                             f"megaring-preprocess verify={where} names the damaged bytes")
        return sample

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``step``: dicts of (micro_batch_size, seq_len / cp) int64."""
        return self.micro_batches_at(self.consumed_samples(step))

    def micro_batches_at(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """Like :meth:`micro_batches`, from a data state (samples consumed before this step)."""
        out = []
        for row in self.sample_ordinals(consumed_samples):
            shards = [self.read_sample(int(k)) for k in row]
            mb = {f: torch.from_numpy(np.stack([s[f] for s in shards])) for f in FIELDS}
            if self.mixture is not None:  # (B,) source id of each sample (per-source losses)
                mb["source"] = torch.tensor([self.mixture.locate(int(k))[0] for k in row], dtype=torch.int64)
            out.append(mb)
        return out


def open_source(cfg: DataConfig):
    """The token source of ``cfg``: a :class:`MockSource` or a :class:`~megaring.data.dataset.Dataset`."""
    problems = cfg.problems()
    if problems:
        raise ValueError(problem_list("invalid data config", problems))
    if cfg.kind == "mock":
        return MockSource(cfg)
    return open_dataset(cfg.path, verify=cfg.verify_checksum)


def describe_data(cfg: DataConfig) -> DataInfo:
    """Check the data config and source cheaply (no sample index); raises ``ValueError`` with every problem.

    ``StoreError`` (a ``ValueError``) names a missing, truncated or corrupted data directory. A
    mixture is described by its first source, with the documents and tokens of all of them.
    """
    if cfg.kind != "mixture":
        return source_info(cfg.kind, open_source(cfg))
    _, opened = open_mixture_sources(cfg)
    return replace(source_info("mixture", opened[0]), num_documents=sum(ds.num_documents for ds in opened),
                   num_tokens=sum(ds.num_tokens for ds in opened))


def tokenizer_identity(ds) -> dict:
    """What must agree between the sources of a mixture: the tokenizer and its special ids."""
    return {"tokenizer_sha256": ds.metadata["tokenizer"].get("sha256"), "vocab_size": ds.vocab_size,
            "bos_id": ds.bos_id, "eod_id": ds.eod_id}


def open_mixture_sources(cfg: DataConfig) -> tuple[list[SourceSpec], list]:
    """The specs and opened stores of ``data.sources`` (name order); every problem at once as a ``ValueError``:
    a store that does not open, one tokenized with another tokenizer than the first source."""
    problems = cfg.problems()
    if problems:
        raise ValueError(problem_list("invalid data config", problems))
    specs, opened = source_specs(cfg.sources), []
    for spec in specs:
        try:
            opened.append(open_dataset(spec.path, verify=cfg.verify_checksum))
        except (ValueError, OSError) as err:
            problems.append(f"data.sources.{spec.name}: {err}")
            opened.append(None)
    ref = next(((spec, ds) for spec, ds in zip(specs, opened) if ds is not None), None)
    for spec, ds in zip(specs, opened):
        if ds is None or ref is None or ds is ref[1]:
            continue
        theirs, ours = tokenizer_identity(ref[1]), tokenizer_identity(ds)
        differing = ", ".join(f"{k} {ours[k]!r} vs {theirs[k]!r}" for k in ours if ours[k] != theirs[k])
        if differing:
            problems.append(f"data.sources.{spec.name} ({spec.path}) and data.sources.{ref[0].name} ({ref[0].path}) "
                            f"were tokenized differently ({differing}): preprocess every source with the same "
                            "tokenizer.model")
    if problems:
        raise ValueError(problem_list("invalid data.sources", problems))
    return specs, [LengthFilter(ds, spec.min_doc_tokens, spec.max_doc_tokens) if spec.filtered else ds
                   for spec, ds in zip(specs, opened)]


def mixture_problems(cfg: DataConfig, shape: BatchShape, max_steps: int, seed: int) -> list[str]:
    """Before any collective: every source holds a sample of its split, and no ``max_epochs`` is passed
    in ``max_steps`` steps (sample counts from the document offsets; no index is built)."""
    specs, opened = open_mixture_sources(cfg)
    out, counts = [], []
    for spec, ds in zip(specs, opened):
        d0, d1 = split_documents(ds.num_documents, cfg.split, spec.valid_fraction)
        n = max(0, (int(ds.doc_starts[d1]) - int(ds.doc_starts[d0]) - 1) // shape.seq_len)
        counts.append(n)
        if n == 0:
            kept = (f" ({ds.num_documents} documents of {spec.min_doc_tokens or 1}-{spec.max_doc_tokens or 'any'} "
                    "tokens kept)") if spec.filtered else ""
            out.append(f"data.sources.{spec.name}: split {cfg.split!r} of {spec.path}{kept} holds no sample of "
                       f"trainer.seq_len + 1 = {shape.seq_len + 1} tokens")
    if out:
        return out
    taken = MixtureSchedule([s.weight for s in specs], seed).counts_before(max_steps * shape.global_batch_size)
    for spec, n, k in zip(specs, counts, taken):
        if spec.max_epochs is not None and k > spec.max_epochs * n:
            out.append(f"data.sources.{spec.name}: {max_steps} steps take {int(k)} samples from it, {k / n:.2f} "
                       f"epochs of its {n}, more than max_epochs={spec.max_epochs:g}: lower its weight or "
                       "trainer.max_steps, or raise max_epochs")
    return out


def source_info(kind: str, source) -> DataInfo:
    """The :class:`DataInfo` of an open :class:`MockSource` or :class:`~megaring.data.dataset.Dataset`."""
    info = DataInfo(kind, source.vocab_size, source.eod_id, source.num_documents, source.num_tokens)
    if isinstance(source, MockSource):
        return info
    return replace(info, bos_id=source.bos_id, path=str(source.path),
                   tokenizer_sha256=source.metadata["tokenizer"].get("sha256"),
                   tokenizer_files=tuple(str(p) for p in source.tokenizer_files))


def store_identity(cfg: DataConfig) -> dict | None:
    """What identifies the token store a run trains on (its checkpoints record it): the tokens (count,
    documents, the index's crc32 of ``tokens.bin``) and the tokenizer (sha256 of its model file,
    vocabulary, special ids). Cheap: the index and ``metadata.json`` only. None for the mock source,
    whose ``data.*`` keys are its identity (compared as config)."""
    if cfg.kind == "mixture":  # per source, its tokens and weight (a moved store keeps its identity)
        specs, opened = open_mixture_sources(cfg)
        return {spec.name: {**_store_identity(spec.path, ds), "weight": spec.weight,
                            **({"doc_tokens": [spec.min_doc_tokens, spec.max_doc_tokens]} if spec.filtered else {})}
                for spec, ds in zip(specs, opened)}
    if cfg.kind != "files" or not cfg.path:
        return None
    return {"path": str(Path(cfg.path).resolve()), **_store_identity(cfg.path, open_dataset(cfg.path))}


def _store_identity(path: str, ds) -> dict:
    return {"documents": ds.num_documents, "tokens": ds.num_tokens, "tokens_crc32": f"{ds.store.bin_crc32:08x}",
            **tokenizer_identity(ds)}


def build_batch_reader(cfg: DataConfig, shape: BatchShape, shard: RankShard, *, seed: int,
                       window: int | None = None) -> BatchReader:
    """The reader of this (dp rank, cp rank), with the split's sample index loaded or built.
    ``window``: the model's sliding window, which the sample costs of ``data.balance`` count."""
    seq_len = shape.seq_len
    if cfg.kind == "mixture":
        return _build_mixture_reader(cfg, shape, shard, seed=seed, window=window)
    source = open_source(cfg)
    d0, d1 = split_documents(source.num_documents, cfg.split, cfg.valid_fraction)
    split_tokens = int(source.doc_starts[d1]) - int(source.doc_starts[d0])
    if split_tokens < seq_len + 1:
        raise ValueError(f"split {cfg.split!r} of the {cfg.kind} data holds {split_tokens} tokens, "
                         f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
    cache = _index_cache_path(cfg, source, seq_len, seed)
    index = load_sample_index(source.doc_starts, d0=d0, d1=d1, seq_len=seq_len, seed=seed, cache_path=cache)
    return BatchReader(source, index, shape, shard, reset_positions=cfg.reset_positions, balance=cfg.balance,
                       window=window)


def _build_mixture_reader(cfg: DataConfig, shape: BatchShape, shard: RankShard, *, seed: int,
                          window: int | None) -> BatchReader:
    """A reader over the sources of ``data.sources``: one sample index each (seed ``[seed, crc32(name)]``,
    cached beside each store), the schedule of :mod:`megaring.data.mixture` over them."""
    specs, opened = open_mixture_sources(cfg)
    indexes = []
    for spec, ds in zip(specs, opened):
        d0, d1 = split_documents(ds.num_documents, cfg.split, spec.valid_fraction)
        one = replace(cfg, kind="files", path=spec.path, valid_fraction=spec.valid_fraction, sources={})
        source_seed = (seed << 32) + spec.seed_salt
        cache = _index_cache_path(one, ds, shape.seq_len, source_seed)
        if cache is not None and spec.filtered:  # another stream than the whole store's
            cache = cache.with_name(f"{cache.stem}-len{spec.min_doc_tokens}-{spec.max_doc_tokens}.npy")
        indexes.append(load_sample_index(ds.doc_starts, d0=d0, d1=d1, seq_len=shape.seq_len, seed=source_seed,
                                         cache_path=cache))
        if indexes[-1].num_samples == 0:
            raise ValueError(f"data.sources.{spec.name}: split {cfg.split!r} of {spec.path} holds no sample of "
                             f"seq_len + 1 = {shape.seq_len + 1} tokens")
    mixture = Mixture(specs, opened, indexes, shape.global_batch_size, seed)
    return BatchReader(opened[0], indexes[0], shape, shard, reset_positions=cfg.reset_positions,
                       balance=cfg.balance, window=window, mixture=mixture)


def _index_cache_path(cfg: DataConfig, source, seq_len: int, seed: int) -> Path | None:
    """``<index_dir>/<split>-seq<L>-seed<S>-<key>.npy``; the key changes whenever the documents do."""
    if cfg.kind == "files":
        directory = Path(cfg.index_dir) if cfg.index_dir else Path(cfg.path) / "index"
        key = f"{source.store.index_crc32:08x}"
    elif cfg.index_dir:
        directory = Path(cfg.index_dir)
        mock = {k: v for k, v in asdict(cfg).items() if k in ("vocab_size", "num_tokens", "mean_doc_len",
                                                                "max_doc_len", "mock_seed")}
        key = "mock-" + hashlib.sha256(json.dumps(mock, sort_keys=True).encode()).hexdigest()[:8]
    else:
        return None
    vf = f"-vf{cfg.valid_fraction:g}" if cfg.valid_fraction else ""
    return directory / f"{cfg.split}{vf}-seq{seq_len}-seed{seed}-{key}.npy"
