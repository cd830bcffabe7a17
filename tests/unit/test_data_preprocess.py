"""megaring-preprocess: round trips, inputs (text, JSONL, gz, globs, stdlib), workers, bad input."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaring.data import PreprocessConfig, TokenizerConfig, open_dataset
from megaring.data import preprocess as pp_module
from megaring.data.encode import PIECE_CHARS
from megaring.data.preprocess import PreprocessError, preprocess
from megaring.data.sources import InputError
from megaring.data.stdlib_corpus import stdlib_sources
from megaring.data.tokenizer import TokenizerError
from megaring.outdir import OutputError

ASCII = "def f(x):\n\treturn  x + 1  # two  spaces\n\n  leading and trailing  \n"
UNICODE = "naïve café — Grüße, 日本語のテキスト, Ελληνικά, emoji 🚀🦀\n\x00ctrl\r\n"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def filler(seed, n_lines):
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, 8)) + f" {int(rng.integers(0, 1000))}\n" for _ in range(n_lines))


def write_corpus(root):
    """A small corpus of every input kind; returns the documents in the order they are stored."""
    root.mkdir()
    docs = [ASCII + filler(0, 150), UNICODE, "json one ünïcödé", "json two\nwith lines", filler(1, 20),
            "gz json", "", "gz text " + UNICODE]
    (root / "a.txt").write_text(docs[0])
    (root / "b.txt").write_text(docs[1])
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(docs[2:5])]
    (root / "c.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    with gzip.open(root / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": docs[5]}) + "\n" + json.dumps({"text": docs[6]}) + "\n")
    with gzip.open(root / "e.txt.gz", "wt") as f:
        f.write(docs[7])
    (root / ".hidden").write_text("never read")
    return [d for d in docs if d]  # the empty document is not stored


def config(input, output, **kw):
    tok = kw.pop("tokenizer", {})
    return PreprocessConfig(input=str(input), output=str(output), progress=False,
                            tokenizer=TokenizerConfig(**{"vocab_size": 400, **tok}), **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    docs = write_corpus(root / "corpus")
    summary = preprocess(config(root / "corpus", root / "out", workers=0))
    return root, docs, summary, root / "out"


def model_of(base):
    return {"model": str(base[3] / "tokenizer.model")}


def test_round_trip_ascii_and_non_ascii(base):
    _, docs, summary, out = base
    ds = open_dataset(out, verify=True)
    assert ds.num_documents == len(docs) == summary["documents"]
    assert summary["empty_documents"] == 1 and summary["tokens"] == ds.num_tokens
    for i, text in enumerate(docs):
        ids = ds.document(i)
        assert ids[-1] == ds.eod_id == ds.tokenizer.eod_id and (ids[:-1] != ds.eod_id).all()
        assert ds.text(i) == text
    assert ds.vocab_size == 400 and ds.store.dtype == np.uint16
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["tokenizer"]["sha256"] == ds.tokenizer.sha256() and meta["config"]["workers"] == 0
    assert [os.path.basename(s) for s in meta["sources"]] == ["a.txt", "b.txt", "c.jsonl", "d.jsonl.gz", "e.txt.gz"]


def test_workers_and_piece_encoding_match_plain_encoding(base, tmp_path):
    root, docs, _, out = base
    long_doc = filler(2, 3 * PIECE_CHARS // 40)  # several pieces' worth of lines
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "long.txt").write_text(long_doc)
    (tmp_path / "in" / "short.txt").write_text(UNICODE)
    preprocess(config(tmp_path / "in", tmp_path / "w2", workers=2, batch_bytes=1000, tokenizer=model_of(base)))
    ds = open_dataset(tmp_path / "w2")
    np.testing.assert_array_equal(ds.document(0)[:-1], ds.tokenizer.sp.encode(long_doc))
    assert ds.tokenizer.splits_at_newlines and ds.text(1) == UNICODE
    again = preprocess(config(root / "corpus", tmp_path / "again", workers=2, batch_bytes=64,
                              tokenizer=model_of(base)))
    assert again["tokenizer"]["source"] != "trained"
    assert (tmp_path / "again" / "tokens.bin").read_bytes() == (out / "tokens.bin").read_bytes()


def test_glob_list_and_stdlib_inputs(base, tmp_path):
    root, docs, _, _ = base
    preprocess(config(f"{root}/corpus/*.txt", tmp_path / "g", tokenizer=model_of(base), workers=0))
    assert [open_dataset(tmp_path / "g").text(i) for i in range(2)] == docs[:2]
    cfg = config("", tmp_path / "l", tokenizer=model_of(base), workers=0)
    cfg.input = [str(root / "corpus" / "b.txt"), str(root / "corpus" / "a.txt")]
    preprocess(cfg)
    assert [open_dataset(tmp_path / "l").text(i) for i in range(2)] == [docs[1], docs[0]]
    preprocess(config("stdlib", tmp_path / "s", max_bytes=150_000, tokenizer=model_of(base), workers=0))
    ds, repos = open_dataset(tmp_path / "s"), stdlib_sources(150_000)
    assert ds.num_documents == len(repos) == 1 and ds.text(0) == repos[0].text()
    assert ds.text(0).count("# ---- file: ") == len(repos[0].files) > 1
    assert "# ---- file: __future__.py ----" in ds.text(0)


@pytest.mark.parametrize("case", ["missing", "no_glob_match", "empty_dir", "empty_corpus", "output_exists",
                                  "missing_model"])
def test_bad_paths_give_clear_errors(base, tmp_path, case):
    root = base[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("")
    (tmp_path / "blank" / "y.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("not a store")
    run = lambda src, out="o", **kw: config(src, tmp_path / out, **{"tokenizer": model_of(base), **kw})  # noqa: E731
    cases = {
        "missing": (run(tmp_path / "nope.txt"), InputError, "nope.txt does not exist"),
        "no_glob_match": (run(f"{tmp_path}/*.jsonl"), InputError, "no files match"),
        "empty_dir": (run(tmp_path / "empty"), InputError, "holds no files"),
        "empty_corpus": (run(tmp_path / "blank"), PreprocessError, "empty corpus"),
        "output_exists": (run(root / "corpus", "exists"), OutputError, r"not a megaring token store \(it holds notes"),
        "missing_model": (run(root / "corpus", tokenizer={"model": str(tmp_path / "m.model")}),
                          TokenizerError, "m.model does not exist"),
    }
    cfg, error, message = cases[case]
    with pytest.raises(error, match=message):
        preprocess(cfg)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


def write_bad_jsonl(path):
    path.write_text('{"text": "good one"}\n{"text": "broken\n{"body": "no text key"}\n{"text": 5}\n'
                    '{"text": "good two"}\n')


def test_malformed_json_names_file_and_line(base, tmp_path):
    write_bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: malformed JSON"):
        preprocess(config(tmp_path / "bad.jsonl", tmp_path / "o", tokenizer=model_of(base), workers=2))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt: not UTF-8"):
        preprocess(config(tmp_path / "latin1.txt", tmp_path / "o", tokenizer=model_of(base), workers=0))
    assert not (tmp_path / "o").exists()


def test_skip_bad_lines_counts_them(base, tmp_path):
    write_bad_jsonl(tmp_path / "bad.jsonl")
    summary = preprocess(config(tmp_path / "bad.jsonl", tmp_path / "o", tokenizer=model_of(base), workers=0,
                                skip_bad_lines=True))
    assert summary["skipped_records"] == 3 and summary["documents"] == 2
    assert any("bad.jsonl:3" in m and "no 'text' field" in m for m in summary["skipped_examples"])
    assert any("bad.jsonl:4" in m and "not a string" in m for m in summary["skipped_examples"])
    ds = open_dataset(tmp_path / "o")
    assert [ds.text(0), ds.text(1)] == ["good one", "good two"]


def test_interrupted_run_leaves_nothing_that_looks_complete(base, tmp_path, monkeypatch):
    calls = []
    original = pp_module.TokenStoreWriter.add

    def add_then_interrupt(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, tokens, lengths)

    monkeypatch.setattr(pp_module.TokenStoreWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(config(base[0] / "corpus", tmp_path / "o", tokenizer=model_of(base), batch_bytes=16, workers=0))
    assert len(calls) == 2 and os.listdir(tmp_path) == []


def test_tokenizer_training_errors(tmp_path):
    (tmp_path / "tiny.txt").write_text("tiny corpus\n")
    with pytest.raises(TokenizerError, match="set tokenizer.vocab_size"):
        preprocess(config(tmp_path / "tiny.txt", tmp_path / "o", tokenizer={"vocab_size": 5000}, workers=0))
    with pytest.raises(PreprocessError, match="tokenizer.type"):
        preprocess(config(tmp_path / "tiny.txt", tmp_path / "o", tokenizer={"type": "word-ish"}))
    assert not (tmp_path / "o").exists()


def test_console_script(base, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "megaring-preprocess")
    bad = subprocess.run([exe, f"input={tmp_path}/missing", f"output={tmp_path}/o"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: input" in bad.stderr and "missing does not exist" in bad.stderr
    usage = subprocess.run([exe, f"output={tmp_path}/o"], capture_output=True, text=True)
    assert usage.returncode == 2 and "error: missing input" in usage.stderr and "Traceback" not in usage.stderr
    good = subprocess.run([exe, f"input={base[0]}/corpus/b.txt", f"output={tmp_path}/o", "workers=1",
                           f"tokenizer.model={base[3]}/tokenizer.model"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "1 documents" in good.stdout and "tokens/s" in good.stderr  # summary line, progress bar
    assert open_dataset(tmp_path / "o").text(0) == UNICODE
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no Hydra output directories
