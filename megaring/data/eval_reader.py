"""Evaluation samples: the validation data in index order, sharded exactly like training batches.

Source: ``data.valid_path`` (a separate token store; all of it is the split) when set, else the
"valid" split (the last ``valid_fraction`` of the documents) of ``data.path`` or the mock corpus.

Order: unshuffled. Sample ``i`` is tokens ``[base + i*L, base + i*L + L + 1)`` of the split's
token stream (the packing of :func:`megaring.data.sample_index.pack_samples`), and eval batch
``j`` holds samples ``[j*G, (j+1)*G)``. Each (dp, cp) rank reads its part of a batch as
:class:`~megaring.data.reader.BatchReader` reads a training step (dp rank ``r``: the ``G/dp``
samples from ``j*G + r*G/dp``, cut into micro-batches; cp rank: its ``shard_ranges``), because it
*is* a BatchReader over an index whose epoch 0 is the identity order. Only full batches are
evaluated: ``num_batches = num_samples // G``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megaring.data.config import DataConfig
from megaring.data.dataset import open_dataset
from megaring.data.mixture import source_specs
from megaring.data.reader import BatchReader, BatchShape, RankShard, open_source
from megaring.data.sample_index import SampleIndex, pack_samples, split_documents
from megaring.errors import problem_list


class EvalReader:
    """Eval batches of this (dp rank, cp rank); see the module docstring for the order."""

    def __init__(self, reader: BatchReader, where: str):
        self.reader, self.where = reader, where

    @property
    def vocab_size(self) -> int:
        return self.reader.vocab_size

    @property
    def eod_id(self) -> int:
        return self.reader.eod_id

    @property
    def num_samples(self) -> int:
        return self.reader.num_samples

    @property
    def num_batches(self) -> int:
        """Full eval batches of ``global_batch_size`` samples."""
        return self.num_samples // self.reader.global_batch_size

    @property
    def num_micro_batches(self) -> int:
        return self.reader.num_micro_batches

    def micro_batches(self, batch: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of eval batch ``batch``: dicts of (micro_batch_size, seq_len / cp) int64."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"eval batch {batch} outside the {self.num_batches} batches of {self.where}")
        return self.reader.micro_batches_at(batch * self.reader.global_batch_size)


def open_eval_split(cfg: DataConfig):
    """``(source, d0, d1, where)``: the validation documents ``[d0, d1)`` of ``source``, described."""
    problems = cfg.problems()
    if problems:
        raise ValueError(problem_list("invalid data config", problems))
    if cfg.valid_path:
        ds = open_dataset(cfg.valid_path, verify=cfg.verify_checksum)
        return ds, 0, ds.num_documents, f"data.valid_path={cfg.valid_path}"
    if cfg.valid_fraction > 0:
        source = open_source(cfg)
        d0, d1 = split_documents(source.num_documents, "valid", cfg.valid_fraction)
        name = f"data.path={cfg.path}" if cfg.kind == "files" else "the mock corpus"
        return source, d0, d1, f"the last {cfg.valid_fraction:g} of the documents of {name}"
    raise ValueError("no validation data: set data.valid_path to a store written by megaring-preprocess, "
                     "or data.valid_fraction > 0 to hold out the last documents of the training data")


def build_eval_reader(cfg: DataConfig, shape: BatchShape, shard: RankShard) -> EvalReader:
    """The eval reader of this (dp rank, cp rank); raises ``ValueError`` when there is not one full batch."""
    seq_len, global_batch_size = shape.seq_len, shape.global_batch_size
    source, d0, d1, where = open_eval_split(cfg)
    rows = pack_samples(source.doc_starts, d0, d1, seq_len)  # (n, 2) in index order
    if rows.shape[0] < global_batch_size:
        raise ValueError(_too_small(cfg, source.doc_starts, (d0, d1), where, shape))
    index = SampleIndex(rows, seed=0)  # ordinals below n are epoch 0: rows in order, no permutation
    reader = BatchReader(source, index, shape, shard, reset_positions=cfg.reset_positions)
    return EvalReader(reader, where)


def mixture_eval_configs(cfg: DataConfig) -> dict[str, DataConfig]:
    """``data=mixture``: one store config per source with a ``valid_fraction`` (its held-out tail,
    unfiltered by ``min_doc_tokens`` / ``max_doc_tokens``), by name."""
    return {spec.name: DataConfig(kind="files", path=spec.path, valid_fraction=spec.valid_fraction,
                                  reset_positions=cfg.reset_positions, index_dir=cfg.index_dir,
                                  verify_checksum=cfg.verify_checksum)
            for spec in source_specs(cfg.sources) if spec.valid_fraction > 0}


def build_eval_readers(cfg: DataConfig, shape: BatchShape, shard: RankShard) -> dict[str, EvalReader]:
    """The eval readers of a run by source name: ``{"": reader}`` for one store, one per source with
    validation data for a mixture (``eval_loss/<name>``)."""
    if cfg.kind != "mixture":
        return {"": build_eval_reader(cfg, shape, shard)}
    return {name: build_eval_reader(one, shape, shard) for name, one in mixture_eval_configs(cfg).items()}


def eval_batch_problems(cfg: DataConfig, shape: BatchShape) -> list[str]:
    """Why the validation data gives no full eval batch of ``shape`` (checked before training starts)."""
    if cfg.kind == "mixture":
        configs = mixture_eval_configs(cfg)
        if not configs:
            return ["eval.every with data=mixture needs validation data: set data.sources.<name>.valid_fraction > 0 "
                    "for the sources to evaluate"]
        return [f"data.sources.{name}: {p}" for name, one in configs.items() for p in eval_batch_problems(one, shape)]
    source, d0, d1, where = open_eval_split(cfg)
    if pack_samples(source.doc_starts, d0, d1, shape.seq_len).shape[0] >= shape.global_batch_size:
        return []
    return [_too_small(cfg, source.doc_starts, (d0, d1), where, shape)]


def _too_small(cfg: DataConfig, doc_starts: np.ndarray, docs: tuple[int, int], where: str, shape: BatchShape) -> str:
    """What the validation data holds, and the fix: with ``valid_fraction``, the smallest that works."""
    seq_len, batch = shape.seq_len, shape.global_batch_size
    tokens = int(doc_starts[docs[1]]) - int(doc_starts[docs[0]])
    said = (f"validation data ({where}) holds {tokens} tokens: {max(0, (tokens - 1) // seq_len)} samples of "
            f"trainer.seq_len + 1 = {seq_len + 1} tokens, fewer than one eval batch of "
            f"{batch} (trainer.global_batch_size)")
    if cfg.valid_path or cfg.valid_fraction <= 0:
        return said + "; use a larger data.valid_path store, or a smaller trainer.seq_len / global_batch_size"
    n = len(doc_starts) - 1
    last = doc_starts[-1] - doc_starts[n - np.arange(1, n + 1)]  # (n,) tokens of the last 1, 2, ... documents
    enough = np.flatnonzero((last - 1) // seq_len >= batch)
    if enough.size == 0 or enough[0] + 1 >= n:
        return said + "; no data.valid_fraction below 1 is enough: use data.valid_path, or a smaller trainer.seq_len"
    minimum = math.ceil((enough[0] + 1) / n * 1e4) / 1e4  # the last enough[0] + 1 documents
    return said + f"; the minimum is data.valid_fraction={minimum:g} (the last {enough[0] + 1} of {n} documents)"
