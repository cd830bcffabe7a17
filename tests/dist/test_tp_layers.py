"""Tensor-parallel layers, regions and the vocab-parallel loss on gloo ranks against plain torch.

Every rank builds the same full weights and inputs from a seed, loads its shard, runs the tp
layer forward and backward, and compares outputs, input grads and weight grads with the
single-device ``F.linear`` / ``F.embedding`` / ``F.cross_entropy`` result restricted to its
shard. tp in (2, 4) on a 4-process world (the other ranks form dp replicas); with and without
sequence parallelism. float32, tolerance 1e-5 relative (norm-wise per tensor).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaring.distributed import ParallelDims, build_mesh
from megaring.tensor_parallel import (
    IGNORE_INDEX,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from megaring.tensor_parallel.mappings import SEQ_DIM, split_along

WORLD, B, S, IN, OUT = 4, 2, 8, 12, 16
RTOL = 1e-5


def rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def _data(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _mesh(world, tp):
    return build_mesh(ParallelDims(dp=world // tp, cp=1, tp=tp))


def _load(layer, full: dict, tp):
    with torch.no_grad():
        for name, param in layer.named_parameters():
            part = layer.tp_partitions.get(name)
            param.copy_(full[name] if part is None else part.shard(full[name], tp.rank, tp.size))


def _shard_last_dim(part, t, tp):
    """A weight partition (over dim 0 of ``(out, in)``) applied to the last dim of an activation."""
    return part.shard(t.movedim(-1, 0), tp.rank, tp.size).movedim(0, -1)


def _column_case(rank, world, tp_size, sp, gather_output):
    tp = _mesh(world, tp_size).tp
    blocks = (OUT,) if gather_output else (8, 4, 4)  # a fused q, k, v-like projection
    x, w, b, dy = _data((B, S, IN), (OUT, IN), (OUT,), (B, S, OUT))
    layer = ColumnParallelLinear(IN, blocks, tp_axis=tp, bias=True, gather_output=gather_output,
                                 sequence_parallel=sp)
    _load(layer, {"weight": w, "bias": b}, tp)
    x_ref = x.clone().requires_grad_()
    w_ref, b_ref = w.clone().requires_grad_(), b.clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy)

    x_in = (split_along(x, SEQ_DIM, tp) if sp else x).requires_grad_()
    y = layer(x_in)
    part = layer.tp_partitions["weight"]
    shard = (lambda t: t) if gather_output else (lambda t: _shard_last_dim(part, t, tp))
    y.backward(shard(dy))
    x_grad_ref = split_along(x_ref.grad, SEQ_DIM, tp) if sp else x_ref.grad
    return {"y": rel_err(y, shard(y_ref)), "dx": rel_err(x_in.grad, x_grad_ref),
            "dw": rel_err(layer.weight.grad, part.shard(w_ref.grad, tp.rank, tp.size)),
            "db": rel_err(layer.bias.grad, part.shard(b_ref.grad, tp.rank, tp.size))}


def _row_case(rank, world, tp_size, sp, input_is_parallel):
    tp = _mesh(world, tp_size).tp
    x, w, b, dy = _data((B, S, IN * 2), (OUT, IN * 2), (OUT,), (B, S, OUT), seed=1)
    layer = RowParallelLinear(IN * 2, OUT, tp_axis=tp, bias=True, input_is_parallel=input_is_parallel,
                              sequence_parallel=sp)
    _load(layer, {"weight": w, "bias": b}, tp)
    x_ref, w_ref, b_ref = (t.clone().requires_grad_() for t in (x, w, b))
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy)

    x_in = (split_along(x, -1, tp) if input_is_parallel else x).requires_grad_()
    y = layer(x_in)
    out_shard = (lambda t: split_along(t, SEQ_DIM, tp)) if sp else (lambda t: t)
    y.backward(out_shard(dy))
    dx_ref = split_along(x_ref.grad, -1, tp) if input_is_parallel else x_ref.grad
    return {"y": rel_err(y, out_shard(y_ref)), "dx": rel_err(x_in.grad, dx_ref),
            "dw": rel_err(layer.weight.grad, split_along(w_ref.grad, 1, tp)),
            "db": rel_err(layer.bias.grad, b_ref.grad)}


def _embedding_case(rank, world, tp_size, sp):
    tp = _mesh(world, tp_size).tp
    vocab = 32
    (w, dy) = _data((vocab, IN), (B, S, IN), seed=2)
    tokens = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(3))
    layer = VocabParallelEmbedding(vocab, IN, tp_axis=tp, sequence_parallel=sp)
    _load(layer, {"weight": w}, tp)
    w_ref = w.clone().requires_grad_()
    y_ref = F.embedding(tokens, w_ref)
    y_ref.backward(dy)
    y = layer(tokens)
    out_shard = (lambda t: split_along(t, SEQ_DIM, tp)) if sp else (lambda t: t)
    y.backward(out_shard(dy))
    return {"y": rel_err(y, out_shard(y_ref)), "dw": rel_err(layer.weight.grad, split_along(w_ref.grad, 0, tp))}


def _cross_entropy_case(rank, world, tp_size):
    tp = _mesh(world, tp_size).tp
    vocab = 40
    (logits,) = _data((B, S, vocab), seed=4)
    logits = logits * 3.0
    labels = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(5))
    labels[0, :3] = IGNORE_INDEX
    dl = torch.rand(B, S, generator=torch.Generator().manual_seed(6))
    ref_in = logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(ref_in.view(-1, vocab), labels.view(-1), reduction="none").view(B, S)
    loss_ref.backward(dl)
    local = split_along(logits, -1, tp).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, tp)
    loss.backward(dl)
    return {"loss": rel_err(loss, loss_ref), "dlogits": rel_err(local.grad, split_along(ref_in.grad, -1, tp)),
            "ignored_zero": float(loss[0, :3].abs().max())}


def _sequence_region_case(rank, world, tp_size):
    """scatter -> gather is the identity; the gather's grad is reduce-scattered (partial grads) or split."""
    tp = _mesh(world, tp_size).tp
    x, dy = _data((B, S, IN), (B, S, IN), seed=7)
    x = x.requires_grad_()
    out = {}
    for partial in (True, False):
        x.grad = None
        y = gather_from_sequence_parallel_region(scatter_to_sequence_parallel_region(x, tp), tp,
                                                 tensor_parallel_output_grad=partial)
        y.backward(dy)
        # With partial grads each rank's dy is one term of a sum over tp ranks.
        want = dy * tp.size if partial else dy
        out[f"y_partial={partial}"] = rel_err(y, x.detach())
        out[f"dx_partial={partial}"] = rel_err(x.grad, want)
    return out


def _assert_small(results, label):
    for rank, errs in enumerate(results):
        for what, err in errs.items():
            assert err <= RTOL, f"{label} rank {rank}: {what} rel err {err:.2e}"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_column_parallel_linear(pools, tp, sp):
    _assert_small(pools(WORLD).run(_column_case, tp, sp, False), f"column tp={tp} sp={sp}")
    if not sp:
        _assert_small(pools(WORLD).run(_column_case, tp, sp, True), f"column gather_output tp={tp}")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_row_parallel_linear(pools, tp, sp):
    _assert_small(pools(WORLD).run(_row_case, tp, sp, True), f"row tp={tp} sp={sp}")
    if not sp:
        _assert_small(pools(WORLD).run(_row_case, tp, sp, False), f"row scattered input tp={tp}")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_vocab_parallel_embedding(pools, tp, sp):
    _assert_small(pools(WORLD).run(_embedding_case, tp, sp), f"embedding tp={tp} sp={sp}")


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy(pools, tp):
    _assert_small(pools(WORLD).run(_cross_entropy_case, tp), f"cross entropy tp={tp}")


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_regions(pools, tp):
    _assert_small(pools(WORLD).run(_sequence_region_case, tp), f"sequence regions tp={tp}")
