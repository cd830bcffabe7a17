"""The output-directory rule (megaring.outdir) in megaring-export and megaring-preprocess, and their
strict keys: no command deletes a file it did not write, its input, or a directory that holds it;
it replaces only its own earlier output, with overwrite=true; SIGTERM removes its temporary; a
typo'd key is an error naming the close key. Single process, except the SIGTERM run."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaring.cli import export as export_module
from megaring.data import PreprocessConfig, StoreError, TokenizerConfig, open_dataset
from megaring.data import preprocess as pp_module
from megaring.data.preprocess import preprocess
from megaring.model import ModelConfig, ParallelContext, build_model, gather_full_state_dict
from megaring.outdir import OutputError, OwnOutput, clear_own, writing
from tests.helpers.cli import ROOT, clean_env

OWN = OwnOutput("a test output", markers=("data.txt",), entries=("data.txt", "extra.txt"))
CORPUS = "".join(f"line {i} of a small corpus about rings and meshes\n" for i in range(300))


def entries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---- the rule itself ----

def test_writing_refuses_foreign_and_input_dirs_and_replaces_only_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"is not empty and is not a test output \(it holds notes.txt\)"):
        with writing(foreign, OWN, overwrite=True):
            pytest.fail("the body must not run")
    assert entries(foreign) == ["notes.txt"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "in.txt").write_text("input")
    for out in (tmp_path / "src", tmp_path, tmp_path / "src" / "in.txt"):
        with pytest.raises(OutputError, match="holds input"):
            with writing(out, OWN, inputs=[tmp_path / "src" / "in.txt"], overwrite=True):
                pass
    with pytest.raises(OutputError, match="is inside input"):
        with writing(tmp_path / "src" / "out", OWN, inputs=[tmp_path / "src"]):
            pass

    out = tmp_path / "out"
    out.mkdir()  # empty: counts as absent
    with writing(out, OWN) as tmp:
        assert tmp.name == f".out.tmp-{os.getpid()}"
        (tmp / "data.txt").write_text("one")
        (tmp / "extra.txt").write_text("one")
    with pytest.raises(OutputError, match=r"already exists and holds a test output \(data.txt, extra.txt\): pass "
                                          "overwrite=true"):
        with writing(out, OWN):
            pass
    with writing(out, OWN, overwrite=True) as tmp:
        (tmp / "data.txt").write_text("two")
    assert entries(out) == ["data.txt"] and (out / "data.txt").read_text() == "two"
    with pytest.raises(RuntimeError), writing(out, OWN, overwrite=True) as tmp:
        (tmp / "data.txt").write_text("three")
        raise RuntimeError("failed half way")
    assert (out / "data.txt").read_text() == "two"
    assert entries(tmp_path) == ["foreign", "out", "src"]  # no temporary or moved-aside directory left


def _sigterm_is_default() -> bool:
    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_cleans_up_in_the_writer_and_kills_forked_workers_as_before(tmp_path):
    """Workers forked while an output is written keep SIGTERM's default: a Python handler inherited
    by a worker blocked in C made Pool.terminate() wait for it forever."""
    with writing(tmp_path / "out", OWN) as tmp:
        (tmp / "data.txt").write_text("x")
        assert not _sigterm_is_default()
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply(_sigterm_is_default)
    assert _sigterm_is_default()  # restored


def test_in_place_writers_empty_only_their_own_earlier_runs(tmp_path):
    from megaring.cli.verify import VERIFY_OUTPUT
    from tools.demo import RUN_OUTPUT

    directory = tmp_path / "d"
    for own, subdirs, files in ((VERIFY_OUTPUT, ["reference", "layout"], []),
                                (RUN_OUTPUT, [".hydra", "checkpoints"], ["metrics.jsonl", "train.log"])):
        for name in subdirs:
            (directory / name).mkdir(parents=True)
        for name in files:
            (directory / name).write_text("")
        clear_own(directory, own)
        assert not directory.exists()
        (directory / subdirs[0]).mkdir(parents=True)
        (directory / "notes.txt").write_text("keep me")
        with pytest.raises(OutputError, match=r"is not empty and is not .*\(it holds notes.txt\)"):
            clear_own(directory, own)
        assert entries(directory) == sorted([subdirs[0], "notes.txt"])
        shutil.rmtree(directory)


# ---- megaring-export ----

def make_run(root):
    """A run directory with one checkpoint's layout-independent state, as training writes it."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
    state = gather_full_state_dict(build_model(cfg, ParallelContext.single(), seed=1), ParallelContext.single())
    step = root / "run" / "checkpoints" / "step_00000002"
    (step / "universal" / "tokenizer").mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (step / "universal" / "tokenizer" / "tokenizer.json").write_text("{}")
    save_file({f"param.{k}": v.float().contiguous() for k, v in state.items()},
              str(step / "universal" / "state-00001.safetensors"))
    meta = {"format": 1, "optimizer_step": 2, "model": asdict(cfg), "dtype": "float32",
            "tokenizer_files": ["tokenizer.json"], "weight_map": {f"param.{k}": "state-00001.safetensors"
                                                                  for k in state}}
    (step / "universal" / "meta.json").write_text(json.dumps(meta))
    (root / "run" / "checkpoints" / "latest").write_text("step_00000002")
    return root / "run"


def export_exit(capsys, *args) -> tuple[int, str]:
    """Exit status and stderr of ``megaring-export args``."""
    try:
        export_module.main(list(args))
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_export_into_the_parent_of_its_input_deletes_nothing(tmp_path, capsys):
    run = make_run(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args in ([f"output={tmp_path}"], [f"output={tmp_path}", "overwrite=true"], [f"output={run}"]):
        status, err = export_exit(capsys, f"input={run}", *args)
        assert status == 2 and f"holds input {run}" in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_export_into_a_foreign_directory_is_refused_and_its_files_survive(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, err = export_exit(capsys, f"input={run}", f"output={out}", "overwrite=true")
    assert status == 2 and "is not empty and is not an exported Hugging Face model (it holds notes.txt)" in err
    assert entries(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert entries(tmp_path) == ["out", "run"]


def test_re_export_replaces_its_own_output_with_overwrite_only(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "hf"
    assert export_exit(capsys, f"input={run}", f"output={out}") == (0, "")
    first = entries(out)
    assert first == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    status, err = export_exit(capsys, f"input={run}", f"output={out}", "dtype=bfloat16")
    assert status == 2 and "already exists and holds an exported Hugging Face model" in err
    assert "pass overwrite=true" in err and "config.json" in err
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}  # unchanged
    assert export_exit(capsys, f"input={run}", f"output={out}", "dtype=bfloat16", "overwrite=true") == (0, "")
    assert entries(out) == first
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert entries(tmp_path) == ["hf", "run"]


def test_export_rejects_unknown_keys_naming_the_closest(tmp_path, capsys):
    status, err = export_exit(capsys, f"input={tmp_path}", f"outptu={tmp_path / 'o'}", "overwrit=true", "step")
    assert status == 2
    assert "unknown key 'outptu' (did you mean output?)" in err
    assert "unknown key 'overwrit' (did you mean overwrite?)" in err
    assert "'step' is not key=value" in err and "usage: megaring-export" in err


# ---- megaring-preprocess ----

def pp_config(input, output, **kw):
    return PreprocessConfig(input=str(input), output=str(output), progress=False, workers=0,
                            tokenizer=TokenizerConfig(**{"vocab_size": 300, **kw.pop("tokenizer", {})}), **kw)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A trained tokenizer, outside every output the tests write."""
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text(CORPUS)
    preprocess(pp_config(root / "corpus.txt", root / "store"))
    return str(root / "store" / "tokenizer.model")


def test_preprocess_into_its_inputs_directory_is_refused_and_the_input_survives(tmp_path, spm_model):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": CORPUS}) + "\n")
    (tmp_path / "notes.txt").write_text("keep me")
    for out, where in ((tmp_path, "holds input"), (tmp_path / "good.jsonl", "holds input")):
        with pytest.raises(OutputError, match=where):
            preprocess(pp_config(good, out, overwrite=True, tokenizer={"model": spm_model}))
    with pytest.raises(OutputError, match="is inside input"):
        preprocess(pp_config(tmp_path, tmp_path / "store", tokenizer={"model": spm_model}))
    assert entries(tmp_path) == ["good.jsonl", "notes.txt"]
    assert good.read_text() == json.dumps({"text": CORPUS}) + "\n"


def test_preprocess_overwrites_its_own_store_only(tmp_path, spm_model):
    (tmp_path / "a.txt").write_text(CORPUS)
    (tmp_path / "b.txt").write_text("another document\n")
    out = tmp_path / "store"
    preprocess(pp_config(tmp_path / "a.txt", out, tokenizer={"model": spm_model}))
    (out / "index").mkdir()  # the sample-index cache training adds
    with pytest.raises(OutputError, match="already exists and holds a megaring token store"):
        preprocess(pp_config(tmp_path / "b.txt", out, tokenizer={"model": spm_model}))
    preprocess(pp_config(tmp_path / "b.txt", out, overwrite=True, tokenizer={"model": spm_model}))
    assert open_dataset(out).text(0) == "another document\n" and not (out / "index").exists()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"is not a megaring token store \(it holds notes.txt\)"):
        preprocess(pp_config(tmp_path / "a.txt", out, overwrite=True, tokenizer={"model": spm_model}))
    assert open_dataset(out).text(0) == "another document\n" and (out / "notes.txt").is_file()
    assert entries(tmp_path) == ["a.txt", "b.txt", "store"]


SIGTERM_RUN = """
import pathlib, sys, time
from megaring.data import preprocess as pp
add, ready = pp.TokenStoreWriter.add, pathlib.Path(sys.argv[1], "ready")
def add_then_wait(self, tokens, lengths):
    add(self, tokens, lengths)
    ready.touch()
    time.sleep(120)
pp.TokenStoreWriter.add = add_then_wait
sys.argv[1:] = sys.argv[2:]  # megaring-preprocess key=value ...
pp.main()
"""


def test_sigterm_during_preprocess_leaves_no_temporary(tmp_path, spm_model):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_RUN, str(tmp_path), f"input={tmp_path / 'corpus.txt'}",
                             f"output={work / 'store'}", "workers=1", "batch_bytes=1000", "progress=false",
                             f"tokenizer.model={spm_model}"], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (tmp_path / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "ready").exists(), proc.communicate()
    assert [p.name for p in work.iterdir()] == [f".store.tmp-{proc.pid}"]  # mid-run
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "removed the unfinished" in err and "Traceback" not in err
    assert list(work.iterdir()) == []


def test_preprocess_rejects_unknown_keys_naming_the_closest(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        pp_module.main([f"input={tmp_path}", f"outptu={tmp_path / 'o'}", "+tokenizer.vocab_sise=300",
                        "++workerz=2", "hydra.verbose=true"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "unknown key 'outptu' (did you mean output?)" in err
    assert "unknown key 'tokenizer.vocab_sise' (did you mean tokenizer.vocab_size?)" in err
    assert "unknown key 'workerz' (did you mean workers?)" in err and "hydra" not in err
    assert list(tmp_path.iterdir()) == []


# ---- misleading messages ----

def test_a_single_long_line_trains_the_tokenizer(tmp_path):
    words = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda omicron sigma upsilon omega naïve café "
             "日本語").split()
    line = " ".join(words[i * 7 % len(words)] + str(i % 13) for i in range(6000))  # ~50 KB, no newline
    (tmp_path / "one.txt").write_text(line)
    summary = preprocess(pp_config(tmp_path / "one.txt", tmp_path / "store",
                                   tokenizer={"vocab_size": 400, "max_sentence_bytes": 1024}))
    ds = open_dataset(tmp_path / "store")
    assert summary["documents"] == 1 and ds.text(0) == line
    assert ds.vocab_size == 400 and summary["tokens"] < len(line) / 2  # words were learned, not only characters


def test_data_path_naming_a_file_says_a_store_directory_is_expected(tmp_path, spm_model):
    (tmp_path / "good.jsonl").write_text("{}\n")
    with pytest.raises(StoreError, match=r"good.jsonl is a file, not a token store directory: preprocess it first"):
        open_dataset(tmp_path / "good.jsonl")
    store = spm_model.rsplit("/", 1)[0]
    with pytest.raises(StoreError, match=f"tokens.bin is a file of a token store: name its directory {store}$"):
        open_dataset(f"{store}/tokens.bin")
