"""The Llama-family decoder: embedding, blocks, final norm, vocab-parallel output.

``build_model(cfg, ctx)`` checks the config against the layout (before any communication),
builds the tp shards and fills them with the layout-independent initialisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaring.errors import problem_list
from megaring.layout import length_problem
from megaring.model.blocks import RMSNorm, TransformerBlock
from megaring.model.config import ModelConfig, check_model_config
from megaring.model.context import ParallelContext
from megaring.model.init import init_weights
from megaring.model.rope import RopeSettings, rope_cos_sin
from megaring.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    mask_padded_vocab,
    parallel_lm_logits,
    vocab_partition,
)


class Transformer(nn.Module):
    """``model(tokens, positions, segment_ids) -> logits (B, S_local, V / tp)``.

    tokens, positions, segment_ids: ``(B, S_local)`` for this cp rank's shard; positions are the
    tokens' global (or per-document) positions and feed the rotary embeddings; segment_ids (optional)
    keep attention inside documents. The logits are this tp rank's shard of the vocabulary padded
    to a multiple of tp (``V_pad / tp`` columns); padded columns are ``-inf``, so they take no
    probability in the loss and get no gradient.
    ``rope_seq_len`` (dynamic RoPE only): the max position + 1 over the global batch; by default
    the max over this rank's positions, all-reduced (MAX) over cp.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.rope = RopeSettings.from_config(cfg)
        sp = ctx.sequence_parallel_active
        self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, tp_axis=ctx.tp, sequence_parallel=sp)
        self.layers = nn.ModuleList(TransformerBlock(cfg, ctx) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, ctx)
        self.output = None
        if not cfg.tie_embeddings:
            vocab = vocab_partition(cfg.vocab_size, ctx.tp.size)
            self.output = ColumnParallelLinear(cfg.dim, vocab.blocks[0], tp_axis=ctx.tp, sequence_parallel=sp)
            # its output rows are the padded vocabulary: full state dicts see the real rows only
            self.output.tp_partitions["weight"] = vocab

    def check_inputs(self, tokens, positions, segment_ids) -> None:
        """Raise one error naming every problem, before any communication."""
        cp, tp = self.ctx.cp.size, self.ctx.tp.size
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, local_seq); got shape {tuple(tokens.shape)}")
        local_len, problems = tokens.shape[1], []
        if (problem := length_problem(local_len * cp, cp, self.ctx.layout)) is not None:
            problems.append(f"{problem} (local length {local_len})")
        if self.ctx.sequence_parallel_active and local_len % tp:
            problems.append(f"with sequence parallelism the local sequence length {local_len} "
                            f"must be divisible by tp={tp}")
        for name, x in (("positions", positions), ("segment_ids", segment_ids)):
            if x is not None and x.shape != tokens.shape:
                problems.append(f"{name} {tuple(x.shape)} must match tokens {tuple(tokens.shape)}")
        if problems:
            raise ValueError(problem_list("invalid model inputs", problems))

    def _rope_seq_len(self, positions: torch.Tensor, rope_seq_len: int | None) -> int | None:
        if not self.rope.depends_on_seq_len or rope_seq_len is not None:
            return rope_seq_len
        longest = positions.max().reshape(1) + 1
        if self.ctx.cp.size > 1:
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.ctx.cp.group)
        return int(longest.item())

    def forward(self, tokens, positions, segment_ids=None, *, rope_seq_len: int | None = None):
        self.check_inputs(tokens, positions, segment_ids)
        h = self.tok_embeddings(tokens)  # (B, S[/tp], dim)
        seq_len = self._rope_seq_len(positions, rope_seq_len)
        cos, sin = rope_cos_sin(positions, self.rope, h.dtype, seq_len)  # (B, S, 1, D)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, segment_ids, use_reentrant=False)
            else:
                h = layer(h, cos, sin, segment_ids)
        h = self.norm(h)
        if self.output is not None:
            logits = self.output(h)  # (B, S, V_pad / tp)
        else:
            logits = parallel_lm_logits(h, self.tok_embeddings.weight, self.ctx.tp, self.ctx.sequence_parallel_active)
        return mask_padded_vocab(logits, self.cfg.vocab_size, self.ctx.tp)


def build_model(cfg: ModelConfig, ctx: ParallelContext, *, seed: int = 0) -> Transformer:
    """The model's shards for this rank, initialised as slices of the (1, 1) model of ``seed``."""
    check_model_config(cfg, tp=ctx.tp.size, cp=ctx.cp.size, ulysses=ctx.cp_ulysses.size,
                       sequence_parallel=ctx.sequence_parallel, layout=ctx.layout)
    model = Transformer(cfg, ctx)
    init_weights(model, cfg, ctx, seed=seed)
    return model
