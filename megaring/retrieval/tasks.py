"""The retrieval tasks of a run: cases built once (the checkpoint's tokenizer), scored at each evaluation.

The tokenizer is the evaluated checkpoint's: a run checkpoint's ``tokenizer/`` (``megaring-eval
checkpoint=``), else ``model.init_from``'s, else the data store's. Every rank builds the same cases
(seeded per case), so nothing about them is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaring.data.reader import RankShard, open_source
from megaring.data.tokenizer import MODEL_FILES, Tokenizer, load_tokenizer
from megaring.distributed.mesh import ParallelMesh
from megaring.retrieval.cases import (
    RETRIEVAL_TASKS,
    Case,
    CaseError,
    Encoder,
    build_cases,
    cell_records,
    chat_encoder,
    write_cases,
)
from megaring.retrieval.checks import task_lengths
from megaring.retrieval.score import score_cases


def tokenizer_dir(cfg, checkpoint_tokenizer: Path | None = None) -> Path:
    """The directory (or file) of the evaluated model's tokenizer; :class:`CaseError` when there is none."""
    if checkpoint_tokenizer is not None and any((checkpoint_tokenizer / n).is_file() for n in MODEL_FILES):
        return checkpoint_tokenizer
    if cfg.model.init_from and any((Path(cfg.model.init_from) / n).is_file() for n in MODEL_FILES):
        return Path(cfg.model.init_from)
    if cfg.data.kind == "files" and cfg.data.path:
        from megaring.data import describe_data

        files = describe_data(cfg.data).tokenizer_files
        if files:
            return Path(files[0]).parent
    raise CaseError("the retrieval tasks build their cases with the model's tokenizer and none was found: evaluate "
                    "a checkpoint that carries one (megaring-eval checkpoint=<run>), a model.init_from directory "
                    "with tokenizer.json or tokenizer.model, or set data.path to the store the model was trained on")


@dataclass
class RetrievalTasks:
    """The cases of each retrieval task of ``tasks``, by task."""

    cases: dict[str, list[Case]]
    batch_size: dict[str, int]
    save_cases: dict[str, bool]

    @classmethod
    def build(cls, cfg, tasks, checkpoint_tokenizer: Path | None = None) -> RetrievalTasks | None:
        wanted = [t for t in RETRIEVAL_TASKS if t in tasks]
        if not wanted:
            return None
        where = tokenizer_dir(cfg, checkpoint_tokenizer)
        tok: Tokenizer = load_tokenizer(where)
        top = max(tok.vocab_size, 1)
        if top > cfg.model.vocab_size:
            raise CaseError(f"the tokenizer of {where} has {top} ids and the model {cfg.model.vocab_size}: "
                            "evaluate the model with its own tokenizer")
        cases, sizes, save = {}, {}, {}
        for task in wanted:
            s = getattr(cfg.eval_tasks, task)
            enc = chat_encoder(str(where if where.is_dir() else where.parent), tok.encode, tok.bos_id) if s.chat \
                else Encoder(tok.encode, tok.bos_id)
            haystack = None
            if task == "needle":
                source = open_source(cfg.data)
                longest = max(task_lengths(cfg, task))
                haystack = np.asarray(source.read(0, min(longest, source.num_tokens)), np.int64)
            settings = _with_lengths(s, task_lengths(cfg, task))
            cases[task] = build_cases(task, enc, settings, haystack)
            sizes[task], save[task] = s.batch_size, s.save_cases
        return cls(cases, sizes, save)

    def evaluate(self, engine, mesh: ParallelMesh, shard: RankShard, device: torch.device,
                 cases_dir: Path | None = None) -> list[dict]:
        """Score every task's cases; one record per (task, length, depth). ``cases_dir``: where global
        rank 0 writes ``<task>.jsonl`` for the tasks with ``save_cases``."""
        records = []
        for task, cases in self.cases.items():
            scores, predicted = score_cases(engine, cases, mesh, shard, device, self.batch_size[task])
            if cases_dir is not None and self.save_cases[task] and mesh.rank == 0:
                write_cases(cases_dir / f"{task}.jsonl", cases, scores, predicted)
            records += cell_records(task, cases, scores)
        return records


def _with_lengths(settings, lengths: list[int]):
    import dataclasses

    return dataclasses.replace(settings, lengths=lengths)


def retrieval_metrics(records: list[dict]) -> dict[str, float]:
    """Flat metrics of retrieval records: ``eval/<task>/<length>/<depth>`` and ``eval/<task>`` (the mean)."""
    out, by_task = {}, {}
    for r in records:
        out[f"eval/{r['task']}/{r['length']}/{r['depth']:g}"] = r["score"]
        by_task.setdefault(r["task"], []).append(r["score"])
    return out | {f"eval/{task}": float(np.mean(s)) for task, s in by_task.items()}
