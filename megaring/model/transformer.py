"""The Llama-family decoder: embedding, blocks, final norm, vocab-parallel output.

``build_model(cfg, ctx)`` checks the config against the layout (before any communication),
builds the tp shards and fills them with the layout-independent initialisation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaring.errors import problem_list
from megaring.layout import length_problem
from megaring.model.blocks import RMSNorm, TransformerBlock
from megaring.model.compile import BlockRunner
from megaring.model.config import ModelConfig, check_model_config
from megaring.model.context import ParallelContext
from megaring.model.head import HeadSettings, OutputLayer, lm_head
from megaring.model.init import init_weights
from megaring.model.offload import offloaded_checkpoint
from megaring.model.rope import RopeSettings, rope_cos_sin
from megaring.tensor_parallel import VocabParallelEmbedding


class Transformer(nn.Module):
    """``model(tokens, positions, segment_ids) -> logits (B, S_local, V / tp)``, or with
    ``labels=`` ``(B, S_local)`` the float32 token losses ``(B, S_local)`` (0 where ignored).

    tokens, positions, segment_ids: ``(B, S_local)`` for this cp rank's shard; positions are the
    tokens' global (or per-document) positions and feed the rotary embeddings; segment_ids (optional)
    keep attention inside documents. The logits are this tp rank's shard of the vocabulary padded
    to a multiple of tp (``V_pad / tp`` columns); padded columns are ``-inf``, so they take no
    probability in the loss and get no gradient. The losses path is the one to train on: with
    ``model.loss_chunk`` it never holds more than one chunk of logits (:mod:`megaring.model.head`).
    ``rope_seq_len`` (dynamic RoPE only): the max position + 1 over the global batch; by default
    the max over this rank's positions, all-reduced (MAX) over cp.
    ``compile_backend``: the ``torch.compile`` backend of the blocks with ``model.compile``.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, *, compile_backend: str | Callable = "inductor"):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.rope = RopeSettings.from_config(cfg)
        sp = ctx.sequence_parallel_active
        self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, tp_axis=ctx.tp, sequence_parallel=sp)
        self.layers = nn.ModuleList(TransformerBlock(cfg, ctx) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, ctx)
        self.head_settings = HeadSettings(cfg.vocab_size, ctx.tp, sp, cfg.loss_chunk)
        self.output = None if cfg.tie_embeddings else OutputLayer(cfg.dim, self.head_settings)
        self.block_runner = BlockRunner(compile_backend) if cfg.compile else None

    def set_rope(self, cfg: ModelConfig) -> None:
        """Use ``cfg``'s RoPE (``rope_theta``, ``rope_scaling``) from the next forward on: a stage of
        ``data.stages`` that changes them. The weights do not depend on RoPE."""
        self.cfg, self.rope = cfg, RopeSettings.from_config(cfg)

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

    def forward(self, tokens, positions, segment_ids=None, *, labels=None, predict: bool = False,
                rope_seq_len: int | None = None):
        """Logits; with ``labels``, the per-token losses; with ``labels`` and ``predict=True``, the greedy
        next token at every labelled position (-1 elsewhere; the argmax over the whole vocabulary, across
        tp ranks), which the retrieval tasks score (megaring.model.head.lm_predictions)."""
        self.check_inputs(tokens, positions, segment_ids)
        h = self.tok_embeddings(tokens)  # (B, S[/tp], dim)
        seq_len = self._rope_seq_len(positions, rope_seq_len)
        cos, sin = rope_cos_sin(positions, self.rope, h.dtype, seq_len)  # (B, S, 1, D)
        # document positions make the attention mask (balanced layout, sliding window); else None
        mask_positions = positions if self.ctx.layout == "balanced" or self.cfg.sliding_window else None
        for layer in self.layers:
            h = self._run_layer(layer, h, cos, sin, segment_ids, mask_positions)
        h = self.norm(h)
        if self.output is not None:
            return self.output(h, labels, predict)  # (B, S, V_pad / tp) logits, or (B, S) losses / predictions
        return lm_head(h, self.tok_embeddings.weight, labels, self.head_settings, predict)

    def _run_layer(self, layer, h, cos, sin, segment_ids, mask_positions):
        run = self.block_runner or _call
        if not (self.cfg.activation_checkpointing and torch.is_grad_enabled()):
            return run(layer, h, cos, sin, segment_ids, mask_positions)
        if self.cfg.checkpoint_offload:
            return offloaded_checkpoint(functools.partial(run, layer), h, cos, sin, segment_ids, mask_positions)
        return checkpoint(run, layer, h, cos, sin, segment_ids, mask_positions, use_reentrant=False)


def _call(block: nn.Module, *args):
    return block(*args)


def build_model(cfg: ModelConfig, ctx: ParallelContext, *, seed: int = 0,
                compile_backend: str | Callable = "inductor") -> Transformer:
    """The model's shards for this rank, initialised as slices of the (1, 1) model of ``seed``."""
    check_model_config(cfg, tp=ctx.tp.size, cp=ctx.cp.size, ulysses=ctx.cp_ulysses.size,
                       sequence_parallel=ctx.sequence_parallel, layout=ctx.layout)
    model = Transformer(cfg, ctx, compile_backend=compile_backend)
    init_weights(model, cfg, ctx, seed=seed)
    return model
