"""Chunked loss, tiled MLP and compiled blocks at (cp, tp) against the plain (1, 1) model.

The reference is the single-process model without any memory feature, its loss computed from the
logits (``tests/dist/test_model_parity.reference``); each rank trains on its shard through the
model's losses entry (``model(..., labels=)``) with the features on, and checks the global loss and
every gathered gradient. Chunk sizes do not divide the local lengths, and with
``valid="first_chunk"`` whole loss chunks hold only ignored labels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch.distributed as dist

from megaring.distributed import ParallelDims, build_mesh
from megaring.layout import shard_sequence
from megaring.model import ParallelContext, build_model, count_valid_tokens, gather_full_grads, local_loss
from tests.dist.test_model_parity import TINY, packed_batch, perturbed_state, reference, rel_err

WORLD = 4
RTOL = 1e-6  # float32, relative (norm-wise per tensor)


def _features_case(rank, world, cfg, cp, tp, sp, batch, state):
    from megaring.model import load_full_state_dict

    mesh = build_mesh(ParallelDims(dp=world // (cp * tp), cp=cp, tp=tp))
    ctx = ParallelContext.from_mesh(mesh, sequence_parallel=sp)
    model = build_model(cfg, ctx, seed=1234)
    load_full_state_dict(model, state, ctx)
    local = {k: shard_sequence(v, dim=1, rank=mesh.cp.rank, world_size=cp) for k, v in batch.items()}
    losses = model(local["tokens"], local["positions"], local["segment_ids"], labels=local["labels"])
    loss = local_loss(losses, count_valid_tokens(local["labels"], mesh.cp))
    loss.backward()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=mesh.cp.group)
    grads = gather_full_grads(model, ctx)
    for grad in grads.values():
        dist.all_reduce(grad, group=mesh.cp.group)
    return global_loss, grads, model.block_runner is not None and model.block_runner.failed


def _check(results, ref, label, rtol=RTOL):
    for rank, (loss, grads, fell_back) in enumerate(results):
        assert not fell_back, f"{label} rank {rank}: compile fell back to eager"
        assert rel_err(loss, ref["loss"]) <= rtol, f"{label} rank {rank}: loss {loss} vs {ref['loss']}"
        errs = {n: rel_err(g, ref["grads"][n]) for n, g in grads.items()}
        worst = max(errs, key=errs.get)
        assert errs[worst] <= rtol, f"{label} rank {rank}: grad {worst} rel err {errs[worst]:.2e}"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_chunked_loss_and_tiled_mlp_match_the_plain_model(pools, tie):
    """vocab 250 (padded at tp=2), loss chunks of 5 tokens and MLP tiles of 3 (local lengths 32 and 16)."""
    plain = dataclasses.replace(TINY, vocab_size=250, tie_embeddings=tie)
    cfg = dataclasses.replace(plain, loss_chunk=5, mlp_chunk=3)
    state = perturbed_state(plain)
    for valid in ("all", "first_chunk"):
        batch = packed_batch(vocab=250, valid=valid)
        ref = reference(plain, batch, packed=True, state=state)
        for cp, tp, sp in [(1, 1, False), (2, 2, True), (2, 2, False)]:
            results = pools(WORLD).run(_features_case, cfg, cp, tp, sp, batch, state)
            _check(results, ref, f"tie={tie} valid={valid} cp={cp} tp={tp} sp={sp}")


@pytest.mark.slow
def test_compiled_blocks_match_eager(pools):
    """``model.compile`` (inductor) at (2, 2) with sequence parallelism: ring attention stays eager.
    Slow: four ranks compile on the test machine's cores (~2 min on 2)."""
    eager = dataclasses.replace(TINY, n_layers=1)  # one block: one compile per rank (~20 s on 2 cores)
    batch, state = packed_batch(), perturbed_state(eager)
    ref = reference(eager, batch, packed=True, state=state)
    results = pools(WORLD).run(_features_case, dataclasses.replace(eager, compile=True), 2, 2, True, batch, state)
    _check(results, ref, "compile cp=2 tp=2 sp", rtol=1e-5)


def _train(rank, world, cfg, run_dir):
    from megaring.train.trainer import train

    return [(m["loss"], m["grad_norm"]) for m in train(cfg, run_dir) if "loss" in m]


@pytest.mark.slow
def test_training_with_every_feature_matches_plain_training_and_profiles(pools, tmp_path):
    """Three steps at cp=2 through the trainer (step.py and the engine use the losses entry); step 2
    is profiled: a Chrome trace with ring attention's regions named."""
    from tests.helpers.train_cfg import make_cfg

    plain = pools(2).run(_train, make_cfg(cp=2), str(tmp_path / "plain"))
    features = ("model.loss_chunk=24", "model.mlp_chunk=10", "model.activation_checkpointing=true",
                "model.checkpoint_offload=true", "trainer.profile_steps=[2,2]")
    got = pools(2).run(_train, make_cfg(cp=2, extra=features), str(tmp_path / "features"))
    for (loss, norm), (want_loss, want_norm) in zip(got[0], plain[0], strict=True):
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss) and abs(norm - want_norm) <= 1e-5 * want_norm
    trace = (tmp_path / "features" / "profile" / "trace_rank0.json").read_text()
    for region in ("ring_attention.forward", "ring_attention.backward", "ring.comm.send_recv", "ring.comm.wait"):
        assert region in trace, f"{region} is not named in the profile"
