"""Evaluation: mean next-token loss and perplexity over validation batches, at any mesh.

Every dp and cp rank computes the token losses of its shard of each eval batch (the reader shards
them exactly like training batches, see :mod:`megaring.data.eval_reader`); the sums and the valid
token counts are all-reduced over ``dp_cp`` once at the end, so ``eval_loss`` is the mean over
every label token of the evaluated samples, whatever the layout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megaring.data import EvalReader
from megaring.distributed.mesh import ParallelMesh
from megaring.engine.deepspeed_engine import TrainEngine
from megaring.model import IGNORE_INDEX


def eval_batches(reader: EvalReader, batches: int) -> int:
    """How many eval batches one evaluation reads: ``batches`` (0: the whole split)."""
    return reader.num_batches if batches == 0 else min(batches, reader.num_batches)


@torch.no_grad()
def evaluate(engine: TrainEngine, reader: EvalReader, batches: int, mesh: ParallelMesh,
             device: torch.device) -> dict[str, float]:
    """``{"eval_loss", "eval_ppl", "eval_tokens"}`` over the first ``batches`` eval batches (0: all)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, valid tokens)
    for j in range(eval_batches(reader, batches)):
        for mb in reader.micro_batches(j):
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            token_losses = engine.forward(mb["tokens"], mb["positions"], mb["segment_ids"], mb["labels"])  # (B, S)
            total[0] += token_losses.double().sum()
            total[1] += (mb["labels"] != IGNORE_INDEX).sum()
    if mesh.dp_cp.size > 1:
        dist.all_reduce(total, group=mesh.dp_cp.group)
    loss = (total[0] / total[1].clamp(min=1.0)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(total[1].item())}


def evaluate_sources(engine: TrainEngine, readers: dict[str, EvalReader], batches: int, mesh: ParallelMesh,
                     device: torch.device) -> dict[str, float]:
    """:func:`evaluate` of one store (``readers = {"": reader}``), or of each source of a mixture:
    ``eval_loss/<name>`` each, and ``eval_loss`` / ``eval_ppl`` / ``eval_tokens`` over all of their tokens."""
    if list(readers) == [""]:
        return evaluate(engine, readers[""], batches, mesh, device)
    parts = {name: evaluate(engine, reader, batches, mesh, device) for name, reader in readers.items()}
    tokens = sum(p["eval_tokens"] for p in parts.values())
    loss = sum(p["eval_loss"] * p["eval_tokens"] for p in parts.values()) / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": tokens,
            **{f"eval_loss/{name}": p["eval_loss"] for name, p in parts.items()}}
