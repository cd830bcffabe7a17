"""The output layer: vocab-parallel logits, or, given labels, the token losses (chunked with ``loss_chunk``)
or the greedy predictions at the labelled positions (``predict=True``, the retrieval tasks' scoring).

The losses path is the model's one loss entry (``model(..., labels=labels)``, used by the training
step, the evaluation and the tests). With ``loss_chunk > 0`` it never materialises the logits of more
than ``loss_chunk`` tokens (:mod:`megaring.tensor_parallel.chunked_cross_entropy`). It lives in the
output module's forward so that ZeRO-3 gathers ``output.weight`` for it like for any forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaring.distributed.mesh import Axis
from megaring.tensor_parallel import (
    IGNORE_INDEX,
    ColumnParallelLinear,
    mask_padded_vocab,
    parallel_lm_logits,
    vocab_parallel_cross_entropy,
    vocab_partition,
)
from megaring.tensor_parallel.chunked_cross_entropy import chunked_lm_cross_entropy
from megaring.tensor_parallel.layers import enter_tensor_parallel_region


@dataclass(frozen=True)
class HeadSettings:
    vocab_size: int  # the real vocabulary (the weight has V_pad / tp rows)
    tp: Axis
    sequence_parallel: bool
    loss_chunk: int  # tokens per chunk of the fused projection + loss; 0: whole logits


def lm_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, s: HeadSettings,
            predict: bool = False) -> torch.Tensor:
    """Logits ``(B, S, V_pad / tp)`` (padded columns ``-inf``) without labels; float32 token losses
    ``(B, S)`` (0 where ignored) with labels; with labels and ``predict``, :func:`lm_predictions`.
    hidden: ``(B, S[/tp], dim)``, weight ``(V_pad / tp, dim)``."""
    if predict:
        if labels is None:
            raise ValueError("predict=True scores the labelled positions: pass labels")
        return lm_predictions(hidden, weight, labels, s)
    if labels is not None and s.loss_chunk:
        return chunked_lm_cross_entropy(hidden, weight, labels, vocab_size=s.vocab_size, tp_axis=s.tp,
                                        sequence_parallel=s.sequence_parallel, chunk=s.loss_chunk)
    logits = mask_padded_vocab(parallel_lm_logits(hidden, weight, s.tp, s.sequence_parallel), s.vocab_size, s.tp)
    return logits if labels is None else vocab_parallel_cross_entropy(logits, labels, s.tp)


def lm_predictions(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: HeadSettings) -> torch.Tensor:
    """The greedy next token ``(B, S)`` int64 at every position whose label is not ignored (-1 elsewhere).

    Only the labelled positions' logits are computed (a handful of answer tokens in a long case,
    never ``S x V``). The argmax over the vocab-parallel logits is exact: each tp rank's best
    column, then the best over tp with the lowest token id among equal logits (``torch.argmax``'s
    rule on the whole vocabulary)."""
    hidden = enter_tensor_parallel_region(hidden, s.tp, s.sequence_parallel and s.tp.size > 1)  # (B, S, dim)
    chosen = labels != IGNORE_INDEX
    logits = F.linear(hidden[chosen], weight).float()  # (n, V_pad / tp)
    local = logits.shape[-1]
    logits = mask_padded_vocab(logits, s.vocab_size, s.tp)
    best, index = logits.max(dim=-1) if logits.shape[0] else (logits.new_empty(0), logits.new_empty(0).long())
    index = index + s.tp.rank * local
    if s.tp.size > 1:
        bests, indexes = [torch.empty_like(best) for _ in range(s.tp.size)], \
            [torch.empty_like(index) for _ in range(s.tp.size)]
        dist.all_gather(bests, best.contiguous(), group=s.tp.group)
        dist.all_gather(indexes, index.contiguous(), group=s.tp.group)
        bests, indexes = torch.stack(bests), torch.stack(indexes)  # (tp, n)
        top = bests.max(dim=0).values
        index = torch.where(bests == top, indexes, torch.iinfo(torch.int64).max).min(dim=0).values
    out = torch.full(labels.shape, -1, dtype=torch.int64, device=labels.device)
    out[chosen] = index
    return out


class OutputLayer(ColumnParallelLinear):
    """``Y = X W^T`` with the (padded) vocabulary split over tp; ``forward(h, labels)`` gives the losses."""

    def __init__(self, dim: int, settings: HeadSettings):
        vocab = vocab_partition(settings.vocab_size, settings.tp.size)
        super().__init__(dim, vocab.blocks[0], tp_axis=settings.tp, sequence_parallel=settings.sequence_parallel)
        self.tp_partitions["weight"] = vocab  # full state dicts see the real rows only
        self.settings = settings

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, predict: bool = False) -> torch.Tensor:
        return lm_head(hidden, self.weight, labels, self.settings, predict)
