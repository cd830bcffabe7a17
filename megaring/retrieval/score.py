"""Scoring retrieval cases on the training mesh: batched, one forward pass per case batch.

The cases of one length are dealt round-robin to the data-parallel slots (dp ranks, times the cp
groups of ``parallel.dynamic_cp``); every rank of a slot takes its cp shard of each case (the run's
layout, :func:`megaring.layout.shard_sequence`) and its tp ranks take the same shard. Each forward
returns the greedy next token at the answer's positions (:func:`megaring.model.head.lm_predictions`,
exact over the vocab-parallel head); those tokens, placed by their global position, and the counts
of right ones are summed over ``dp_cp`` once per task, so a score is a ratio of integers and the
predictions are token ids: identical at every layout.

Every rank runs the same number of forwards (a slot short of cases fills its batch with a case
whose labels are all ignored), so the collectives inside the model always meet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megaring.data.reader import RankShard
from megaring.distributed.mesh import ParallelMesh
from megaring.layout import shard_sequence
from megaring.model import IGNORE_INDEX
from megaring.retrieval.cases import Case


def case_tensors(cases: Sequence[Case | None], length: int) -> dict[str, torch.Tensor]:
    """The full ``(B, length)`` fields of a case batch; ``None``: a filler row that scores nothing."""
    tokens = torch.zeros(len(cases), length, dtype=torch.int64)
    labels = torch.full((len(cases), length), IGNORE_INDEX, dtype=torch.int64)
    for row, case in enumerate(cases):
        if case is None:
            continue
        ids = torch.from_numpy(case.ids)
        tokens[row] = ids
        n = case.answer_len
        labels[row, length - n - 1:length - 1] = ids[length - n:]
    positions = torch.arange(length, dtype=torch.int64).expand(len(cases), length).contiguous()
    return {"tokens": tokens, "positions": positions, "segment_ids": torch.zeros_like(tokens), "labels": labels}


def slot_of(shard: RankShard) -> tuple[int, int]:
    """(this rank's data-parallel slot, the number of slots)."""
    return shard.dp_rank * shard.cp_groups + shard.cp_group, shard.dp_size * shard.cp_groups


@torch.no_grad()
def score_cases(engine, cases: Sequence[Case], mesh: ParallelMesh, shard: RankShard, device: torch.device,
                batch_size: int) -> tuple[list[float], list[list[int]]]:
    """The score of every case (the fraction of its answer tokens predicted) and the greedy tokens
    predicted for its answer, the same on every rank."""
    counts = torch.zeros(len(cases), 2, dtype=torch.float64, device=device)  # (right, answer tokens)
    widest = max((c.answer_len for c in cases), default=0)
    guesses = torch.zeros(len(cases), widest, dtype=torch.int64, device=device)  # predicted id + 1; 0: not here
    slot, slots = slot_of(shard)
    by_length: dict[int, list[int]] = {}
    for i, case in enumerate(cases):
        by_length.setdefault(case.length, []).append(i)
    for length, members in sorted(by_length.items()):
        mine = members[slot::slots]
        per_slot = -(-len(members) // slots)  # the most cases a slot takes
        rounds = -(-per_slot // batch_size)  # the same number of forwards on every rank
        for r in range(rounds):
            rows = mine[r * batch_size:(r + 1) * batch_size]
            batch = case_tensors([cases[i] for i in rows] + [None] * (batch_size - len(rows)), length)
            local = {k: shard_sequence(v, dim=1, rank=shard.cp_rank, world_size=shard.cp_size, layout=shard.layout,
                                       segment_ids=batch["segment_ids"]).to(device) for k, v in batch.items()}
            predicted = engine.forward(local["tokens"], local["positions"], local["segment_ids"], local["labels"],
                                       predict=True)  # (B, S_local)
            scored = local["labels"] != IGNORE_INDEX
            right = ((predicted == local["labels"]) & scored).sum(dim=1)
            for row, i in enumerate(rows):
                counts[i, 0] += right[row]
                counts[i, 1] += scored[row].sum()
                first = length - cases[i].answer_len - 1  # the position that predicts the answer's first token
                guesses[i, local["positions"][row][scored[row]] - first] = predicted[row][scored[row]] + 1
    if mesh.dp_cp.size > 1:
        dist.all_reduce(counts, group=mesh.dp_cp.group)
        dist.all_reduce(guesses, group=mesh.dp_cp.group)
    scores = (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist()
    return scores, [(guesses[i, :c.answer_len] - 1).tolist() for i, c in enumerate(cases)]
