"""Single-process model tests: configs, validation, layout-independent init, state dicts, loss, RoPE,
packed documents, checkpointing and the FLOPs formula.

Layouts with tp > 1 are built here with axes that have no process group: construction and
initialisation never communicate, so each tp rank's shards can be checked in one process, and a
bad configuration must raise before anything tries to use the (missing) group.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from megaring.config_dir import CONFIG_DIR
from megaring.distributed.mesh import Axis
from megaring.model import (
    IGNORE_INDEX,
    ModelConfig,
    ParallelContext,
    build_model,
    check_model_config,
    count_valid_tokens,
    gather_full_state_dict,
    load_full_state_dict,
    local_loss,
    model_flops_per_token,
    num_params,
    padded_vocab_size,
    validate_model_config,
    vocab_parallel_cross_entropy,
)
from megaring.model.flops import layer_matmul_params
from megaring.model.init import tp_partitions
from megaring.model.rope import RopeSettings, apply_rope, rope_cos_sin

TINY = ModelConfig()
RTOL = 1e-5


def fake_ctx(tp=1, tp_rank=0, cp=1, cp_rank=0, **options) -> ParallelContext:
    """A context whose axes have no group: fine for building, fatal for any collective."""
    return ParallelContext(Axis("tp", None, tp_rank, tp, tuple(range(tp))),
                           Axis("cp", None, cp_rank, cp, tuple(range(cp))), **options)


def load_config(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(f"{CONFIG_DIR}/model/{name}.yaml")))


def rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def inputs(batch=2, seq=32, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    return tokens, torch.arange(seq).expand(batch, seq)


# --- configs and validation ---------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [
    ("tiny", None), ("125m", None),
    ("1b", 1_235_814_400),  # published sizes of Llama-3.2-1B, Llama-2-7B, Llama-3-8B
    ("7b", 6_738_415_616), ("llama3_8b", 8_030_261_248),
])
def test_named_configs_load_and_have_published_sizes(name, params):
    cfg = load_config(name)
    assert cfg.name == name
    assert validate_model_config(cfg) == []
    if params is not None:
        assert num_params(cfg) == params
    if name == "tiny":
        assert cfg == TINY  # the dataclass defaults are the tiny model
        assert sum(p.numel() for p in build_model(cfg, ParallelContext.single()).parameters()) == num_params(cfg)


def test_llama_ffn_rule():
    cfg = ModelConfig(dim=4096, n_heads=32, ffn_dim=None, multiple_of=1024, ffn_dim_multiplier=1.3)
    assert cfg.hidden_dim == 14336  # Llama-3-8B's intermediate size from its params.json rule
    assert padded_vocab_size(50257, 128) == 50304


def test_every_bad_layout_is_reported_at_once():
    cfg = ModelConfig(vocab_size=250, n_heads=6, n_kv_heads=3, dim=48, ffn_dim=102, sliding_window=0,
                      rope_scaling={"rope_type": "ntk"})
    problems = validate_model_config(cfg, tp=4, cp=2, seq_len=30)
    text = "\n".join(problems)
    for needle in ("n_heads=6", "n_kv_heads=3", "ffn_dim=102", "2*cp=4", "sliding_window=0", "'ntk'"):
        assert needle in text, f"{needle!r} missing from {problems}"
    assert len(problems) == 6  # the vocabulary is padded, not a problem
    assert validate_model_config(TINY, tp=4, cp=4, seq_len=64, sequence_parallel=True) == []


def test_sequence_parallel_needs_local_length_divisible_by_tp():
    problems = validate_model_config(TINY, tp=4, cp=2, seq_len=36, sequence_parallel=True)
    assert len(problems) == 1 and "divisible by parallel.tp=4" in problems[0]
    assert validate_model_config(TINY, tp=4, cp=2, seq_len=36) == []


@pytest.mark.parametrize("change,tp,needle", [
    (dict(n_heads=6, dim=48), 4, "n_heads=6"),
    (dict(n_kv_heads=2), 4, "n_kv_heads=2"),
    (dict(ffn_dim=190), 4, "ffn_dim=190"),
    (dict(n_kv_heads=3), 1, "multiple of model.n_kv_heads=3"),
])
def test_build_model_raises_before_communicating(change, tp, needle):
    cfg = dataclasses.replace(TINY, **change)
    with pytest.raises(ValueError, match=needle):
        build_model(cfg, fake_ctx(tp=tp))
    with pytest.raises(ValueError, match="invalid model config"):
        check_model_config(cfg, tp=tp)


@pytest.mark.parametrize("tp,cp,sp,seq_local,needle", [
    (1, 2, False, 15, r"divisible by 2\*cp=4"),
    (4, 1, True, 10, "divisible by tp=4"),
    (4, 2, True, 6, "divisible by tp=4"),
])
def test_forward_rejects_bad_sequence_lengths_before_communicating(tp, cp, sp, seq_local, needle):
    model = build_model(TINY, fake_ctx(tp=tp, cp=cp, sequence_parallel=sp))
    tokens, positions = inputs(seq=seq_local)
    with pytest.raises(ValueError, match=needle):
        model(tokens, positions)


# --- layout-independent init and full state dicts -----------------------------------------------

@pytest.mark.parametrize("tp", [2, 4])
def test_init_shards_are_slices_of_the_single_process_model(tp):
    full = dict(build_model(TINY, ParallelContext.single(), seed=3).named_parameters())
    shards = [dict(build_model(TINY, fake_ctx(tp=tp, tp_rank=r), seed=3).named_parameters()) for r in range(tp)]
    partitions = tp_partitions(build_model(TINY, fake_ctx(tp=tp), seed=3))
    assert shards[0].keys() == full.keys()
    for name, want in full.items():
        part = partitions.get(name)
        if part is None:
            assert all(torch.equal(s[name], want) for s in shards), name
        else:
            assert shards[0][name].shape != want.shape, f"{name} is not split"
            assert torch.equal(part.unshard([s[name] for s in shards]), want), name
    other_seed = dict(build_model(TINY, ParallelContext.single(), seed=4).named_parameters())
    assert not torch.equal(other_seed["layers.0.attention.wqkv.weight"], full["layers.0.attention.wqkv.weight"])


def test_load_full_state_dict_slices_and_checks():
    ctx = ParallelContext.single()
    state = {n: torch.randn_like(w) for n, w in gather_full_state_dict(build_model(TINY, ctx), ctx).items()}
    model = build_model(TINY, fake_ctx(tp=2, tp_rank=1))
    load_full_state_dict(model, state, model.ctx)
    wqkv = model.layers[1].attention.wqkv
    assert torch.equal(wqkv.weight, wqkv.tp_partitions["weight"].shard(state["layers.1.attention.wqkv.weight"], 1, 2))
    bad = dict(state, extra=torch.zeros(1))
    bad.pop("norm.weight")
    bad["output.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as info:
        load_full_state_dict(model, bad, model.ctx)
    for needle in ("missing key 'norm.weight'", "unexpected key 'extra'", "output.weight: shape (3, 3)"):
        assert needle in str(info.value)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_odd_vocab_is_padded_inside_the_model_only(tie):
    """vocab 250 at tp=4: shards of 63 rows (2 zero padding rows on the last rank), full state dicts
    of 250 rows at every tp, init an exact slice of the (1, 1) model, padded logits -inf."""
    cfg = dataclasses.replace(TINY, vocab_size=250, tie_embeddings=tie)
    full = gather_full_state_dict(build_model(cfg, ParallelContext.single(), seed=3), ParallelContext.single())
    assert full["tok_embeddings.weight"].shape == (250, cfg.dim)
    shards = [build_model(cfg, fake_ctx(tp=4, tp_rank=r), seed=3) for r in range(4)]
    names = ["tok_embeddings.weight"] + ([] if tie else ["output.weight"])
    for name in names:
        local = [dict(m.named_parameters())[name] for m in shards]
        assert local[3].shape == (63, cfg.dim) and local[3][-2:].eq(0).all()
        part = tp_partitions(shards[0])[name]
        assert torch.equal(part.unshard(local), full[name]), name
    model = shards[3]
    load_full_state_dict(model, {k: v + 1 for k, v in full.items()}, model.ctx)
    assert model.tok_embeddings.weight[-2:].eq(0).all() and model.tok_embeddings.weight[:-2].ne(0).all()
    single = build_model(cfg, ParallelContext.single())
    assert single(*inputs(vocab=250)).shape[-1] == 250
    single_tp = build_model(cfg, fake_ctx(tp=1))
    assert torch.isfinite(single_tp(*inputs(vocab=250))).all()


def test_tied_embeddings_share_one_weight():
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    model = build_model(cfg, ParallelContext.single())
    state = gather_full_state_dict(model, ParallelContext.single())
    assert "output.weight" not in state and model.output is None
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


# --- loss ----------------------------------------------------------------------------------------

def test_cross_entropy_matches_torch_and_ignores_labels():
    logits = (3 * torch.randn(2, 16, 40)).requires_grad_()
    labels = torch.randint(0, 40, (2, 16))
    labels[1, 5:] = IGNORE_INDEX
    losses = vocab_parallel_cross_entropy(logits, labels, ParallelContext.single().tp)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 40), labels.view(-1), reduction="none").view(2, 16)
    assert rel_err(losses, ref) <= RTOL and losses[1, 5:].eq(0).all()
    local_loss(losses, count_valid_tokens(labels)).backward()
    F.cross_entropy(ref_logits.view(-1, 40), labels.view(-1)).backward()
    assert rel_err(logits.grad, ref_logits.grad) <= RTOL


def test_no_valid_token_gives_zero_loss_not_nan():
    logits = torch.randn(1, 8, 40, requires_grad=True)
    labels = torch.full((1, 8), IGNORE_INDEX)
    loss = local_loss(vocab_parallel_cross_entropy(logits, labels, ParallelContext.single().tp),
                      count_valid_tokens(labels))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# --- positions, documents, checkpointing ------------------------------------------------------------

def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), RopeSettings(16, 10000.0), torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), RopeSettings(16, 10000.0), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)

    assert torch.allclose(score(7, 3), score(104, 100), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(score(7, 3), score(7, 5), rtol=1e-3)


def test_packed_documents_equal_separate_documents():
    model = build_model(TINY, ParallelContext.single(), seed=2)
    doc_a, _ = inputs(batch=1, seq=10, seed=1)
    doc_b, _ = inputs(batch=1, seq=22, seed=2)
    tokens = torch.cat([doc_a, doc_b], dim=1)  # (1, 32)
    positions = torch.cat([torch.arange(10), torch.arange(22)])[None]
    segment_ids = torch.cat([torch.zeros(10), torch.ones(22)]).long()[None]
    with torch.no_grad():
        packed = model(tokens, positions, segment_ids)
        alone_a = model(doc_a, torch.arange(10)[None])
        alone_b = model(doc_b, torch.arange(22)[None])
        leaky = model(tokens, positions)  # no segment ids: doc b attends to doc a
    assert rel_err(packed[:, :10], alone_a) <= RTOL
    assert rel_err(packed[:, 10:], alone_b) <= RTOL
    assert rel_err(leaky[:, 10:], alone_b) > 1e-3


def test_activation_checkpointing_keeps_the_gradients():
    tokens, positions = inputs()
    grads = []
    for ac in (False, True):
        model = build_model(dataclasses.replace(TINY, activation_checkpointing=ac), ParallelContext.single())
        vocab_parallel_cross_entropy(model(tokens, positions), tokens, model.ctx.tp).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert rel_err(grads[1][name], grad) <= RTOL, name


# --- FLOPs --------------------------------------------------------------------------------------------

def test_matmul_flops_match_a_flop_counter():
    """The 6 * N_matmul part of the formula equals torch's count of matmul FLOPs of one training step
    (the fused attention op is not counted by FlopCounterMode, matmuls are)."""
    model = build_model(TINY, ParallelContext.single())
    tokens, positions = inputs(seq=32)
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens, positions).sum().backward()
    n_matmul = TINY.n_layers * layer_matmul_params(TINY) + TINY.vocab_size * TINY.dim
    assert counter.get_flop_counts()["Global"][torch.ops.aten.mm] == 6 * n_matmul * tokens.numel()
    attention = model_flops_per_token(TINY, 32) - 6 * n_matmul
    assert attention == 6 * TINY.n_layers * TINY.dim * 32  # causal: half of 12 * L * H * D * T
