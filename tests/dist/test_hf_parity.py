"""A Hugging Face Llama checkpoint loaded with ``load_hf_weights`` at (cp, tp) on gloo ranks.

The checkpoint (GQA, untied, odd vocabulary 101, llama3 RoPE scaling, saved in shards) is read by
every rank for its own tp slices. Per layout, every rank checks: the global loss on a fixed batch
(zigzag shards, positions from the layout, local losses summed over cp) against transformers' own
loss (float32, 1e-5 relative), the gradients of a few parameters (summed over cp, gathered over tp)
against the single-process (1, 1) megaring model's, and the bytes it read: at tp=2 about half of
tp=1 (at most 0.6x). Unused ranks of the 4-process world are dp replicas running the same batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megaring.distributed import ParallelDims, build_mesh
from megaring.hf import hf_model_config, load_hf_weights
from megaring.model import (
    IGNORE_INDEX,
    ParallelContext,
    Transformer,
    count_valid_tokens,
    gather_full_grads,
    local_loss,
    vocab_parallel_cross_entropy,
)
from megaring.layout import shard_sequence
from tests.helpers.hf_models import hf_loss_and_logits, llama_dir, qwen2_dir

transformers = pytest.importorskip("transformers")
WORLD, SEQ, RTOL = 4, 32, 1e-5
CHECKED = ("tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention.wqkv.weight",
           "layers.1.attention.wo.weight", "layers.1.feed_forward.w13.weight", "layers.0.attention_norm.weight", "layers.0.attention.wqkv.bias")
LAYOUTS = [(2, 1, False), (1, 2, False), (1, 2, True), (2, 2, False), (2, 2, True)]


def make_batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, SEQ), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return dict(tokens=tokens, labels=labels, positions=torch.arange(SEQ).expand(2, SEQ).contiguous())


def run_layout(rank, world, directory, cp, tp, sp, batch):
    mesh = build_mesh(ParallelDims(dp=world // (cp * tp), cp=cp, tp=tp))
    ctx = ParallelContext.from_mesh(mesh, sequence_parallel=sp)
    model = Transformer(hf_model_config(directory), ctx)
    report = load_hf_weights(model, ctx, directory)
    local = {k: shard_sequence(v, dim=1, rank=mesh.cp.rank, world_size=cp) for k, v in batch.items()}
    logits = model(local["tokens"], local["positions"])
    loss = local_loss(vocab_parallel_cross_entropy(logits, local["labels"], ctx.tp),
                      count_valid_tokens(local["labels"], mesh.cp))
    loss.backward()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=mesh.cp.group)
    grads = gather_full_grads(model, ctx)
    checked = [n for n in CHECKED if n in grads]  # tied models have no output.weight
    for name in checked:
        dist.all_reduce(grads[name], group=mesh.cp.group)
    return dict(loss=global_loss.item(), grads={n: grads[n] for n in checked}, bytes_read=report.bytes_read)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return reference(llama_dir(tmp_path_factory.mktemp("hf") / "llama", max_shard_size="50KB"))


def reference(directory) -> dict:
    """transformers' loss, and the (1, 1) megaring model's gradients and bytes read, on a fixed batch."""
    batch = make_batch(hf_model_config(directory).vocab_size)
    hf_loss, _ = hf_loss_and_logits(directory, batch["tokens"])
    ctx = ParallelContext.single()
    model = Transformer(hf_model_config(directory), ctx)
    bytes_tp1 = load_hf_weights(model, ctx, directory).bytes_read
    logits = model(batch["tokens"], batch["positions"])
    loss = local_loss(vocab_parallel_cross_entropy(logits, batch["labels"], ctx.tp), count_valid_tokens(batch["labels"]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert abs(loss.item() - hf_loss.item()) <= RTOL * hf_loss.item()
    return dict(directory=directory, batch=batch, hf_loss=hf_loss.item(), grads=grads, bytes_tp1=bytes_tp1)


def rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("cp,tp,sp", LAYOUTS, ids=[f"cp{c}_tp{t}{'_sp' if s else ''}" for c, t, s in LAYOUTS])
def test_loaded_llama_matches_transformers_and_single_process(pools, checkpoint, cp, tp, sp):
    check_layout(pools, checkpoint, cp, tp, sp)


def test_loaded_qwen2_with_biases_matches_at_cp2_tp2(pools, tmp_path):
    """Qwen2: q/k/v biases (column-parallel, sharded with their rows), tied embeddings."""
    check_layout(pools, reference(qwen2_dir(tmp_path / "qwen2")), 2, 2, True)


def check_layout(pools, checkpoint, cp, tp, sp):
    results = pools(WORLD).run(run_layout, checkpoint["directory"], cp, tp, sp, checkpoint["batch"])
    for rank, r in enumerate(results):
        where = f"cp={cp} tp={tp} sp={sp} rank {rank}"
        assert abs(r["loss"] - checkpoint["hf_loss"]) <= RTOL * checkpoint["hf_loss"], f"{where}: loss {r['loss']}"
        for name, grad in r["grads"].items():
            err = rel_err(grad, checkpoint["grads"][name])
            assert err <= RTOL, f"{where}: grad {name} rel err {err:.2e}"
        ratio = r["bytes_read"] / checkpoint["bytes_tp1"]
        if tp == 1:
            assert ratio == 1.0, f"{where}: read {ratio:.2f}x the tp=1 bytes"
        else:
            assert ratio <= 0.6, f"{where}: read {ratio:.2f}x the tp=1 bytes, expected about 1/{tp}"
