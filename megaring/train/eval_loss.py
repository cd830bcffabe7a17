"""Evaluation: mean next-token loss and perplexity over validation batches, at any mesh.

Every dp and cp rank computes the token losses of its shard of each eval batch (the reader shards
them exactly like training batches, see :mod:`megaring.data.eval_reader`); the sums and the valid
token counts are all-reduced over ``dp_cp`` once at the end, so ``eval_loss`` is the mean over
every label token of the evaluated samples, whatever the layout.

``eval.tasks=[position_loss]`` adds the mean loss per bucket of token position (the position inside
its document, the context the token is predicted from): ``eval/position_loss/<a>-<b>`` for
positions ``[a, b)`` and its token count ``eval/position_tokens/<a>-<b>``. A model that uses its
context predicts later tokens better, so the curve falls with position where the extension works.
Buckets are sums over each rank's own tokens, all-reduced with the totals: the same at any layout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megaring.data import EvalReader
from megaring.distributed.mesh import ParallelMesh
from megaring.engine.deepspeed_engine import TrainEngine
from megaring.model import IGNORE_INDEX

EVAL_TASKS = ("position_loss", "passkey", "needle")  # eval.tasks= (megaring.retrieval: the last two)


def position_edges(seq_len: int, edges: list[int] | None = None) -> list[int]:
    """Bucket edges ``[0, e_1, ..., seq_len]``: ``edges`` (increasing, from 0), else powers of two."""
    if edges:
        return [*edges, seq_len] if edges[-1] < seq_len else list(edges)
    out, b = [0], 1
    while b < seq_len:
        out.append(b)
        b *= 2
    return out + [seq_len]


def position_edges_problems(edges: list[int] | None) -> list[str]:
    if not edges:
        return []
    if edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])) or \
            not all(isinstance(e, int) and not isinstance(e, bool) for e in edges):
        return [f"eval_tasks.position_loss.buckets={list(edges)} must be increasing integers from 0 (bucket "
                "edges; the last bucket ends at trainer.seq_len), or null for powers of two"]
    return []


class PositionSums:
    """Loss sums and token counts per position bucket, float64 (2, buckets) on ``device``."""

    def __init__(self, edges: list[int], device: torch.device):
        self.edges = edges
        self.inner = torch.tensor(edges[1:-1], dtype=torch.int64, device=device)
        self.sums = torch.zeros(2, len(edges) - 1, dtype=torch.float64, device=device)

    def add(self, token_losses: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        bucket = torch.bucketize(positions.clamp(max=self.edges[-1] - 1), self.inner, right=True)  # (B, S)
        bucket = bucket[valid]
        self.sums[0].index_add_(0, bucket, token_losses[valid].double())
        self.sums[1].index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))

    def metrics(self) -> dict[str, float | int | None]:
        out = {}
        for i, (a, b) in enumerate(zip(self.edges, self.edges[1:])):
            n = int(self.sums[1, i].item())
            out[f"eval/position_loss/{a}-{b}"] = (self.sums[0, i] / n).item() if n else None
            out[f"eval/position_tokens/{a}-{b}"] = n
        return out


def eval_batches(reader: EvalReader, batches: int) -> int:
    """How many eval batches one evaluation reads: ``batches`` (0: the whole split)."""
    return reader.num_batches if batches == 0 else min(batches, reader.num_batches)


@torch.no_grad()
def evaluate(engine: TrainEngine, reader: EvalReader, batches: int, mesh: ParallelMesh,
             device: torch.device, positions: PositionSums | None = None) -> dict[str, float]:
    """``{"eval_loss", "eval_ppl", "eval_tokens"}`` over the first ``batches`` eval batches (0: all);
    ``positions``: also adds every token's loss to its position bucket (reduced by the caller)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, valid tokens)
    for j in range(eval_batches(reader, batches)):
        for mb in reader.micro_batches(j):
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            token_losses = engine.forward(mb["tokens"], mb["positions"], mb["segment_ids"], mb["labels"])  # (B, S)
            valid = mb["labels"] != IGNORE_INDEX
            total[0] += token_losses.double().sum()
            total[1] += valid.sum()
            if positions is not None:
                positions.add(token_losses, mb["positions"], valid)
    if mesh.dp_cp.size > 1:
        dist.all_reduce(total, group=mesh.dp_cp.group)
    loss = (total[0] / total[1].clamp(min=1.0)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(total[1].item())}


def evaluate_sources(engine: TrainEngine, readers: dict[str, EvalReader], batches: int, mesh: ParallelMesh,
                     device: torch.device, position_edges: list[int] | None = None) -> dict[str, float]:
    """:func:`evaluate` of one store (``readers = {"": reader}``), or of each source of a mixture:
    ``eval_loss/<name>`` each, and ``eval_loss`` / ``eval_ppl`` / ``eval_tokens`` over all of their tokens.
    ``position_edges``: the ``position_loss`` task over every evaluated token (:class:`PositionSums`)."""
    sums = PositionSums(position_edges, device) if position_edges else None
    out = _evaluate_sources(engine, readers, batches, mesh, device, sums)
    if sums is None:
        return out
    if mesh.dp_cp.size > 1:
        dist.all_reduce(sums.sums, group=mesh.dp_cp.group)
    return out | sums.metrics()


def _evaluate_sources(engine, readers, batches, mesh, device, sums) -> dict[str, float]:
    if list(readers) == [""]:
        return evaluate(engine, readers[""], batches, mesh, device, sums)
    parts = {name: evaluate(engine, reader, batches, mesh, device, sums) for name, reader in readers.items()}
    tokens = sum(p["eval_tokens"] for p in parts.values())
    loss = sum(p["eval_loss"] * p["eval_tokens"] for p in parts.values()) / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": tokens,
            **{f"eval_loss/{name}": p["eval_loss"] for name, p in parts.items()}}
