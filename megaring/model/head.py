"""The output layer: vocab-parallel logits, or, given labels, the token losses (chunked with ``loss_chunk``).

The losses path is the model's one loss entry (``model(..., labels=labels)``, used by the training
step, the evaluation and the tests). With ``loss_chunk > 0`` it never materialises the logits of more
than ``loss_chunk`` tokens (:mod:`megaring.tensor_parallel.chunked_cross_entropy`). It lives in the
output module's forward so that ZeRO-3 gathers ``output.weight`` for it like for any forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaring.distributed.mesh import Axis
from megaring.tensor_parallel import (
    ColumnParallelLinear,
    mask_padded_vocab,
    parallel_lm_logits,
    vocab_parallel_cross_entropy,
    vocab_partition,
)
from megaring.tensor_parallel.chunked_cross_entropy import chunked_lm_cross_entropy


@dataclass(frozen=True)
class HeadSettings:
    vocab_size: int  # the real vocabulary (the weight has V_pad / tp rows)
    tp: Axis
    sequence_parallel: bool
    loss_chunk: int  # tokens per chunk of the fused projection + loss; 0: whole logits


def lm_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, s: HeadSettings) -> torch.Tensor:
    """Logits ``(B, S, V_pad / tp)`` (padded columns ``-inf``) without labels; float32 token losses
    ``(B, S)`` (0 where ignored) with labels. hidden: ``(B, S[/tp], dim)``, weight ``(V_pad / tp, dim)``."""
    if labels is not None and s.loss_chunk:
        return chunked_lm_cross_entropy(hidden, weight, labels, vocab_size=s.vocab_size, tp_axis=s.tp,
                                        sequence_parallel=s.sequence_parallel, chunk=s.loss_chunk)
    logits = mask_padded_vocab(parallel_lm_logits(hidden, weight, s.tp, s.sequence_parallel), s.vocab_size, s.tp)
    return logits if labels is None else vocab_parallel_cross_entropy(logits, labels, s.tp)


class OutputLayer(ColumnParallelLinear):
    """``Y = X W^T`` with the (padded) vocabulary split over tp; ``forward(h, labels)`` gives the losses."""

    def __init__(self, dim: int, settings: HeadSettings):
        vocab = vocab_partition(settings.vocab_size, settings.tp.size)
        super().__init__(dim, vocab.blocks[0], tp_axis=settings.tp, sequence_parallel=settings.sequence_parallel)
        self.tp_partitions["weight"] = vocab  # full state dicts see the real rows only
        self.settings = settings

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return lm_head(hidden, self.weight, labels, self.settings)
