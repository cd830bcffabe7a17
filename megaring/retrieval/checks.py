"""Config problems of the retrieval tasks, found before any collective (every one in one list)."""

from __future__ import annotations

from megaring.model.config import seq_len_problems
from megaring.retrieval.cases import NAMES


def task_lengths(cfg, task: str) -> list[int]:
    """``eval_tasks.<task>.lengths``, or ``[trainer.seq_len]``."""
    return list(getattr(cfg.eval_tasks, task).lengths or [cfg.trainer.seq_len])


def retrieval_problems(cfg, tasks) -> list[str]:
    """Problems of ``eval_tasks.passkey`` / ``eval_tasks.needle`` for the tasks in ``tasks``."""
    p, out = cfg.parallel, []
    for task in [t for t in ("passkey", "needle") if t in tasks]:
        s, key = getattr(cfg.eval_tasks, task), f"eval_tasks.{task}"
        bad_depths = [d for d in s.depths if not 0.0 <= d <= 1.0]
        if bad_depths or not s.depths:
            out.append(f"{key}.depths={list(s.depths)}: depths are fractions of the context in [0, 1] "
                       f"(outside: {bad_depths})" if bad_depths else f"{key}.depths is empty: give at least one depth")
        for name in ("samples", "batch_size"):
            if getattr(s, name) < 1:
                out.append(f"{key}.{name}={getattr(s, name)} must be >= 1")
        if not 1 <= s.key_digits <= 18:
            out.append(f"{key}.key_digits={s.key_digits} must be in 1-18")
        if task == "needle":
            if not 0 <= s.distractors < len(NAMES):
                out.append(f"{key}.distractors={s.distractors} must be in 0-{len(NAMES) - 1}")
            if cfg.data.kind != "files" or not cfg.data.path:
                out.append(f"the needle task hides its facts in real text: set data.path to a store written by "
                           f"megaring-preprocess (data.kind=files; it is {cfg.data.kind})")
        lengths = task_lengths(cfg, task)
        if min(p.tp, p.cp, p.ulysses) < 1:
            continue
        for length in lengths:
            if length < 1:
                out.append(f"{key}.lengths: {length} must be >= 1")
                continue
            for problem in seq_len_problems(length, tp=p.tp, cp=p.cp, sequence_parallel=p.sequence_parallel,
                                         layout=p.layout):
                out.append(f"{key}.lengths: {length} does not fit this layout: {problem}")
            if length > cfg.model.max_position_embeddings:
                out.append(f"{key}.lengths: {length} is longer than the model can hold "
                           f"(model.max_position_embeddings={cfg.model.max_position_embeddings}): score shorter "
                           "cases, or raise model.max_position_embeddings with a model.rope_scaling that reaches it")
    return out
