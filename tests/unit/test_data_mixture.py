"""data.kind=mixture: weighted sources on a deterministic schedule, each in its own order, mesh-independent."""

import numpy as np
import pytest
import torch

from megaring.data import BatchShape, DataConfig, RankShard, build_batch_reader, write_tokenized
from megaring.data.mixture import MixtureSchedule
from megaring.data.reader import mixture_problems
from megaring.layout import unshard_sequence

VOCAB, EOD = 1000, 999
WEIGHTS = {"books": 0.5, "code": 0.3, "web": 0.2}


def write_store(path, n_docs: int, doc_len: int, seed: int, vocab: int = VOCAB):
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, vocab - 1, rng.integers(doc_len // 2, doc_len) - 1), vocab - 1)
            for _ in range(n_docs)]
    return write_tokenized(path, docs, vocab_size=vocab, eod_id=vocab - 1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Three stores of very different sizes: 30, 300 and 3000 documents."""
    root = tmp_path_factory.mktemp("mix")
    return {name: write_store(root / name, n, 200, seed).path
            for (name, n, seed) in (("books", 30, 1), ("code", 300, 2), ("web", 3000, 3))}


def mixture_cfg(stores, **overrides) -> DataConfig:
    sources = {name: {"path": str(stores[name]), "weight": w} for name, w in WEIGHTS.items()}
    return DataConfig(kind="mixture", sources=overrides.pop("sources", sources), **overrides)


def reader(cfg, *, G=8, mb=1, dp=1, dp_rank=0, cp=1, cp_rank=0, seq_len=64, seed=7):
    return build_batch_reader(cfg, BatchShape(seq_len, G, mb), RankShard(dp_rank, dp, cp_rank, cp, "zigzag"), seed=seed)


def test_shares_stay_within_two_percent_of_the_weights_over_any_100_steps(stores):
    rd = reader(mixture_cfg(stores))
    mix, G = rd.mixture, 8
    shares = np.array([WEIGHTS[n] for n in mix.names])
    for first_step in (0, 13, 250, 1000):
        counts = np.zeros(3)
        for step in range(first_step, first_step + 100):
            got = mix.step_counts(rd.consumed_samples(step))
            assert sum(got.values()) == G
            counts += [got[n] for n in mix.names]
        assert np.abs(counts / (100 * G) - shares).max() < 0.02, (first_step, counts)
    # far into a run too, from the closed form (no step-by-step walk)
    far = np.bincount(MixtureSchedule(list(shares), 7).sources_of(10**9, 800), minlength=3) / 800
    assert np.abs(far - shares).max() < 0.02


def test_each_source_is_read_in_its_own_order_with_its_own_epochs(stores):
    rd = reader(mixture_cfg(stores))
    mix = rd.mixture
    taken = {n: [] for n in mix.names}
    for k in range(400):  # books (30 docs, ~14 samples) wraps into later epochs
        s, source, _, start = mix.locate(k)
        taken[mix.names[s]].append(start)
    for s, name in enumerate(mix.names):
        index = mix.indexes[s]
        assert taken[name] == [index.locate(j)[1] for j in range(len(taken[name]))]
    books = mix.indexes[mix.names.index("books")]
    assert len(taken["books"]) > 2 * books.num_samples  # several epochs
    first, second = taken["books"][:books.num_samples], taken["books"][books.num_samples:2 * books.num_samples]
    assert sorted(first) == sorted(second) and first != second  # each epoch reshuffled


def global_batch(cfg, step, *, dp, cp, mb, seq_len=64):
    """``{(source id, start token): tokens}`` of a step, rebuilt from every (dp, cp) rank's shards."""
    out = {}
    for dp_rank in range(dp):
        rds = [reader(cfg, G=8, mb=mb, dp=dp, dp_rank=dp_rank, cp=cp, cp_rank=r, seq_len=seq_len) for r in range(cp)]
        for k in rds[0].sample_ordinals(rds[0].consumed_samples(step)).ravel():
            s, _, _, start = rds[0].mixture.locate(int(k))
            shards = [torch.from_numpy(rd.read_sample(int(k))["tokens"])[None] for rd in rds]
            out[(s, start)] = unshard_sequence(shards, dim=1, layout="zigzag")[0]
    return out


@pytest.mark.parametrize("balance", ["none", "work"])
def test_the_same_samples_at_every_layout_for_20_steps(stores, balance):
    cfg = mixture_cfg(stores, balance=balance)
    for step in range(20):
        ref = global_batch(cfg, step, dp=1, cp=1, mb=8)
        assert len(ref) == 8
        for dp, cp, mb in ((2, 2, 1), (1, 2, 2)):  # (1, 2, 2): tp does not enter the reader
            got = global_batch(cfg, step, dp=dp, cp=cp, mb=mb)
            assert got.keys() == ref.keys(), (step, dp, cp)
            assert all(torch.equal(got[k], ref[k]) for k in ref), (step, dp, cp)


def test_a_reader_started_mid_run_reads_what_the_running_one_does(stores):
    cfg = mixture_cfg(stores)
    running = reader(cfg)
    for step in range(30):
        running.micro_batches(step)
    fresh = reader(cfg)  # a resume: only the consumed count is known
    for a, b in zip(fresh.micro_batches(30), running.micro_batches(30)):
        assert all(torch.equal(a[f], b[f]) for f in a)


def test_every_problem_of_the_sources_at_once(stores, tmp_path):
    other = write_store(tmp_path / "other", 20, 100, 9, vocab=500).path
    cfg = DataConfig(kind="mixture", path="/x", sources={
        "books": {"path": str(stores["books"]), "weight": 0},
        "code": {"path": str(stores["code"]), "weight": -1, "wieght": 2},
        "web": {"path": str(tmp_path / "missing"), "weight": 1},
    })
    problems = "\n".join(cfg.problems())
    for line in ("data.sources.books.weight must be a positive number, got 0",
                 "data.sources.code.weight must be a positive number, got -1",
                 "data.sources.code: unknown keys ['wieght']", "data.path is not used with data.kind=mixture"):
        assert line in problems, problems
    fine = mixture_cfg(stores, sources={"books": {"path": str(stores["books"]), "weight": 1},
                                        "odd": {"path": str(other), "weight": 1},
                                        "gone": {"path": str(tmp_path / "missing"), "weight": 1}})
    with pytest.raises(ValueError) as err:
        reader(fine)
    msg = str(err.value)
    assert "data.sources.gone" in msg and str(tmp_path / "missing") in msg
    assert "data.sources.odd" in msg and "were tokenized differently (vocab_size 500 vs 1000" in msg
    assert DataConfig(kind="mixture").problems() == [
        "data.kind=mixture needs data.sources: a mapping of names to {path: <store>, weight: <w>}"]


def test_max_epochs_and_empty_sources_are_found_before_training(stores):
    sources = {name: {"path": str(stores[name]), "weight": w} for name, w in WEIGHTS.items()}
    sources["books"]["max_epochs"] = 2
    cfg = mixture_cfg(stores, sources=sources)
    shape = BatchShape(64, 8, 1)
    assert mixture_problems(cfg, shape, max_steps=5, seed=7) == []
    (problem,) = mixture_problems(cfg, shape, max_steps=100, seed=7)
    assert problem.startswith("data.sources.books: 100 steps take") and "more than max_epochs=2" in problem
    (empty,) = mixture_problems(cfg, BatchShape(8192, 8, 1), max_steps=1, seed=7)
    assert empty.startswith("data.sources.books: split 'train'") and "holds no sample" in empty


def test_the_prolong_recipe_of_configs_data_composes():
    from pathlib import Path

    from tests.helpers.train_cfg import compose_cfg

    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = compose_cfg("model=tiny", "data=prolong_mix", f"hydra.searchpath=[file://{configs}]")
    assert cfg.data.kind == "mixture"
    assert {n: s["weight"] for n, s in cfg.data.sources.items()} == {"books": 0.25, "code_repos": 0.15,
                                                                     "short_sft": 0.6}
    assert not [p for p in cfg.data.problems() if "data.sources" in p]


def test_length_filters_pack_only_the_documents_in_range(stores):
    sources = {name: {"path": str(stores[name]), "weight": w} for name, w in WEIGHTS.items()}
    sources["web"].update(min_doc_tokens=150, max_doc_tokens=180)
    rd = reader(mixture_cfg(stores, sources=sources))
    mix = rd.mixture
    web = mix.names.index("web")
    view = mix.sources[web]
    store = view.inner
    lengths = np.diff(store.doc_starts)
    kept = [store.document(i) for i in range(store.num_documents) if 150 <= lengths[i] <= 180]
    assert 0 < view.num_documents == len(kept) < store.num_documents
    stream = np.concatenate(kept)
    seen = 0
    for k in range(200):
        s, source, _, start = mix.locate(k)
        if s != web:
            continue
        got = rd.read_sample(k)
        np.testing.assert_array_equal(got["tokens"], stream[start:start + 64])  # the kept documents only
        np.testing.assert_array_equal(got["labels"], stream[start + 1:start + 65])
        assert (np.diff(np.flatnonzero(np.append(got["positions"], 0) == 0)) <= 180).all()
        seen += 1
    assert seen > 10
    bad = dict(sources, web={"path": str(stores["web"]), "weight": 1, "min_doc_tokens": 9, "max_doc_tokens": 3})
    assert "data.sources.web: min_doc_tokens=9 is above max_doc_tokens=3" in mixture_cfg(stores, sources=bad).problems()
