"""The model at (cp, tp) on gloo ranks against the single-process (1, 1) model: same seed, same batch.

Per case every rank checks, against the reference computed in the (undistributed) test process:
its logits shard (zigzag cp shard of the sequence, tp shard of the vocabulary), the global loss
(sum of the local losses over cp), every parameter gradient (summed over cp, gathered over tp),
the gathered full state dict (bit-exact: initialisation is layout-independent) and that grads of
tp-replicated parameters are identical on all tp ranks. Unused ranks of the 4-process world form
dp replicas running the same batch. float32; tolerance 1e-5 relative (norm-wise per tensor).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from megaring.distributed import ParallelDims, build_mesh
from megaring.model import (
    IGNORE_INDEX,
    ModelConfig,
    ParallelContext,
    build_model,
    count_valid_tokens,
    gather_full_grads,
    gather_full_state_dict,
    load_full_state_dict,
    local_loss,
    vocab_parallel_cross_entropy,
)
from megaring.model.init import tp_partitions
from megaring.layout import shard_sequence
from megaring.tensor_parallel.mappings import all_gather_list

WORLD = 4
SEQ, BATCH, SEED = 32, 2, 1234
RTOL = 1e-5
TINY = ModelConfig()  # the defaults are megaring/configs/model/tiny.yaml


def packed_batch(seq_len: int = SEQ, vocab: int = 256, seed: int = 0, valid: str = "all") -> dict:
    """Two samples: packed documents of lengths 5, 14, 13 (positions restart at each start) and one
    document spanning the whole sequence. Labels are the next token inside a document, -100 at a
    document's last token. ``valid="first_chunk"`` keeps labels only in the first 1/8 of the sequence."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, seq_len), generator=g)
    doc_lengths = ([5, 14, seq_len - 19], [seq_len])
    segment_ids = torch.cat([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d))[None]
                             for d in doc_lengths])
    positions = torch.cat([torch.cat([torch.arange(n) for n in d])[None] for d in doc_lengths])
    labels = tokens.roll(-1, dims=1)
    labels[segment_ids != segment_ids.roll(-1, dims=1)] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    if valid == "first_chunk":
        labels[:, seq_len // 8:] = IGNORE_INDEX
    return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, labels=labels)


def perturbed_state(cfg: ModelConfig, seed: int = 5) -> dict:
    """The (1, 1) initial weights plus noise, so that zero-initialised biases and unit norms matter."""
    ctx = ParallelContext.single()
    state = gather_full_state_dict(build_model(cfg, ctx, seed=SEED), ctx)
    g = torch.Generator().manual_seed(seed)
    return {n: w + 0.05 * torch.randn(w.shape, generator=g) for n, w in state.items()}


def _build(cfg, ctx, state):
    model = build_model(cfg, ctx, seed=SEED)
    if state is not None:
        load_full_state_dict(model, state, ctx)
    return model


def reference(cfg: ModelConfig, batch: dict, packed: bool, state: dict | None = None) -> dict:
    """(1, 1) model in this (undistributed) process: logits, loss, grads, weights."""
    ctx = ParallelContext.single()
    model = _build(cfg, ctx, state)
    seg = batch["segment_ids"] if packed else None
    logits = model(batch["tokens"], batch["positions"], seg)
    losses = vocab_parallel_cross_entropy(logits, batch["labels"], ctx.tp)
    loss = local_loss(losses, count_valid_tokens(batch["labels"]))
    loss.backward()
    return dict(logits=logits.detach(), loss=loss.detach(), weights=gather_full_state_dict(model, ctx),
                grads={n: p.grad for n, p in model.named_parameters()})


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def _replicated_grad_spread(model, ctx) -> float:
    """Max |difference| of a tp-replicated parameter's grad between tp ranks (should be 0)."""
    partitions, spread = tp_partitions(model), 0.0
    for name, param in model.named_parameters():
        if name not in partitions and ctx.tp.size > 1:
            grads = all_gather_list(param.grad, ctx.tp)
            spread = max(spread, max((g - grads[0]).abs().max().item() for g in grads))
    return spread


def _run_case(rank, world, cfg, cp, tp, sp, packed, batch, ref, state=None, ring_backward="whole", ring_settings=None,
              ulysses=1):
    mesh = build_mesh(ParallelDims(dp=world // (cp * tp), cp=cp, tp=tp, ulysses=ulysses))
    ctx = ParallelContext.from_mesh(mesh, sequence_parallel=sp, ring_backward=ring_backward,
                                    **({"ring_settings": ring_settings} if ring_settings else {}))
    model = _build(cfg, ctx, state)
    local = {k: shard_sequence(v, dim=1, rank=mesh.cp.rank, world_size=cp) for k, v in batch.items()}
    logits = model(local["tokens"], local["positions"], local["segment_ids"] if packed else None)
    losses = vocab_parallel_cross_entropy(logits, local["labels"], ctx.tp)
    loss = local_loss(losses, count_valid_tokens(local["labels"], mesh.cp))
    loss.backward()

    # this rank's vocab columns [start, stop) of the real vocabulary; the rest is padding (-inf)
    local_vocab = logits.shape[-1]
    start = mesh.tp.rank * local_vocab
    stop = min(start + local_vocab, cfg.vocab_size)
    want_logits = shard_sequence(ref["logits"], dim=1, rank=mesh.cp.rank, world_size=cp)[..., start:stop]
    padding_masked = bool(torch.isneginf(logits[..., stop - start:]).all().item())
    logits = logits[..., :stop - start]
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=mesh.cp.group)
    grads = gather_full_grads(model, ctx)
    grad_errs = {}
    for name, grad in grads.items():
        dist.all_reduce(grad, group=mesh.cp.group)
        grad_errs[name] = rel_err(grad, ref["grads"][name])
    weights = gather_full_state_dict(model, ctx)
    return dict(
        logits=rel_err(logits.detach(), want_logits),
        loss=rel_err(global_loss, ref["loss"]),
        local_loss_finite=bool(torch.isfinite(loss).item()),
        padding_masked=padding_masked,
        grads=grad_errs,
        weights_equal=all(torch.equal(weights[n], ref["weights"][n]) for n in ref["weights"])
        and weights.keys() == ref["weights"].keys(),
        replicated_spread=_replicated_grad_spread(model, ctx),
    )


LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (1, 2, True), (2, 2, False), (2, 2, True),
           (4, 1, False), (1, 4, False), (1, 4, True)]


def _check(results, label):
    for rank, r in enumerate(results):
        where = f"{label} rank {rank}"
        assert r["logits"] <= RTOL, f"{where}: logits rel err {r['logits']:.2e}"
        assert r["loss"] <= RTOL, f"{where}: loss rel err {r['loss']:.2e}"
        assert r["local_loss_finite"], f"{where}: local loss is not finite"
        assert r["padding_masked"], f"{where}: padded vocabulary logits are not -inf"
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] <= RTOL, f"{where}: grad {worst} rel err {r['grads'][worst]:.2e}"
        assert r["weights_equal"], f"{where}: gathered weights differ from the (1, 1) model's"
        assert r["replicated_spread"] == 0.0, f"{where}: replicated grads differ over tp"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_layouts_match_single_process(pools, packed):
    batch = packed_batch()
    ref = reference(TINY, batch, packed)
    for cp, tp, sp in LAYOUTS:
        results = pools(WORLD).run(_run_case, TINY, cp, tp, sp, packed, batch, ref)
        _check(results, f"cp={cp} tp={tp} sp={sp} packed={packed}")


def _chunked_case(rank, world, cfg, cp, tp, sp, packed, batch, ref):
    """The chunked ring backward, with chunks of a few rows so that each block is really cut."""
    from megaring.ring import RingSettings

    return _run_case(rank, world, cfg, cp, tp, sp, packed, batch, ref, ring_backward="chunked",
                     ring_settings=RingSettings(grad_chunks=3, min_chunk_rows=1))


@pytest.mark.parametrize("cp,tp,sp", [(4, 1, False), (2, 2, True)])
def test_chunked_ring_backward_matches_single_process(pools, cp, tp, sp):
    batch = packed_batch()
    ref = reference(TINY, batch, True)
    _check(pools(WORLD).run(_chunked_case, TINY, cp, tp, sp, True, batch, ref), f"chunked cp={cp} tp={tp}")


@pytest.mark.parametrize("cp,tp,sp", [(4, 1, False), (2, 2, True)])
def test_ranks_without_valid_tokens_contribute_zero(pools, cp, tp, sp):
    batch = packed_batch(valid="first_chunk")  # only cp rank 0 holds valid labels
    ref = reference(TINY, batch, packed=True)
    results = pools(WORLD).run(_run_case, TINY, cp, tp, sp, True, batch, ref)
    _check(results, f"cp={cp} tp={tp} sp={sp} sparse labels")


def test_tied_biased_checkpointed_variant_loaded_from_full_state(pools):
    cfg = dataclasses.replace(TINY, tie_embeddings=True, attention_bias=True, mlp_bias=True,
                              activation_checkpointing=True, n_kv_heads=2, rope_theta=500000.0)
    # n_kv_heads=2 with tp=2: one kv head per rank.
    batch, state = packed_batch(), perturbed_state(cfg)
    ref = reference(cfg, batch, packed=True, state=state)
    assert "output.weight" not in ref["weights"]
    for cp, tp, sp in [(2, 2, True), (1, 2, False)]:
        results = pools(WORLD).run(_run_case, cfg, cp, tp, sp, True, batch, ref, state)
        _check(results, f"variant cp={cp} tp={tp} sp={sp}")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_odd_vocab_at_tp_matches_single_process(pools, tie):
    """vocab 250: padded to 252 at tp=2 and tp=4 inside the model; the loss, every gradient and the
    gathered (unpadded) weights equal the (1, 1) model's, and the padding logits are -inf."""
    cfg = dataclasses.replace(TINY, vocab_size=250, tie_embeddings=tie)
    batch = packed_batch(vocab=250)
    ref = reference(cfg, batch, packed=True)
    for cp, tp, sp in [(1, 2, False), (2, 2, True), (1, 4, True)]:
        results = pools(WORLD).run(_run_case, cfg, cp, tp, sp, True, batch, ref)
        _check(results, f"vocab=250 tie={tie} cp={cp} tp={tp} sp={sp}")
