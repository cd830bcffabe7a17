"""Tokenizers that come with checkpoints: tokenizer.json / Hugging Face directories, BOS / EOS conventions."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer as HFLibTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from megaring.data import DataConfig, PreprocessConfig, StoreError, TokenizerConfig, describe_data, open_dataset
from megaring.data.preprocess import preprocess
from megaring.data.tokenizer import HFTokenizer, TokenizerError, file_sha256, load_tokenizer

SPECIALS = ["<s>", "</s>", "<pad>", "<|endoftext|>"]
DOCS = ["hello world, the quick brown fox\n\n  jumps over\tthe lazy dog.\n", "naïve café 日本語 🚀 Grüße",
        "short", "def f(x):\n    return x + 1\n" * 20]


def train_bpe(bos_template: bool) -> HFLibTokenizer:
    """A byte-level BPE of 300 ids (so any text round-trips); the post-processor adds ``<s>`` when asked."""
    tk = HFLibTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(DOCS * 5, trainer)
    if bos_template:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tk


def write_tokenizer_dir(path, *, bos_template=True, tokenizer_config=None, extra=None):
    """``path/tokenizer.json`` plus ``tokenizer_config.json`` (and any ``extra`` json files)."""
    path.mkdir(parents=True)
    train_bpe(bos_template).save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"} if tokenizer_config is None else tokenizer_config
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in (extra or {}).items():
        (path / name).write_text(json.dumps(content))
    return path


def preprocess_docs(tmp_path, tokenizer_model, name="out", docs=DOCS, **kw):
    corpus = tmp_path / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / name
    summary = preprocess(PreprocessConfig(input=str(corpus), output=str(out), progress=False,
                                          tokenizer=TokenizerConfig(model=tokenizer_model and str(tokenizer_model),
                                                                    vocab_size=350), **kw))
    return summary, out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok") / "model")


def test_conventions_from_post_processor_and_configs(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eod_id) == (0, 1)
    assert tok.vocab_size == tok.tk.get_vocab_size(with_added_tokens=True) == 300
    assert list(tok.files) == ["tokenizer.json", "tokenizer_config.json"]
    same = load_tokenizer(tok_dir / "tokenizer.json")  # the file itself: conventions from beside it
    assert (same.bos_id, same.eod_id, same.sha256()) == (0, 1, file_sha256(tok_dir / "tokenizer.json"))
    # add_bos_token decides over the post-processor; eos from config.json when tokenizer_config has none.
    off = load_tokenizer(write_tokenizer_dir(tmp_path / "off", tokenizer_config={"add_bos_token": False,
                                                                                "eos_token": "</s>"}))
    assert off.bos_id is None and off.eod_id == 1
    qwen_like = write_tokenizer_dir(tmp_path / "q", bos_template=False, tokenizer_config={"bos_token": None},
                                    extra={"config.json": {"eos_token_id": [3, 1], "bos_token_id": None}})
    tok = load_tokenizer(qwen_like)
    assert (tok.bos_id, tok.eod_id) == (None, 3)
    forced = write_tokenizer_dir(tmp_path / "f", bos_template=False,
                                 tokenizer_config={"add_bos_token": True, "bos_token": {"content": "<s>"},
                                                   "eos_token": "<|endoftext|>"})
    assert (load_tokenizer(forced).bos_id, load_tokenizer(forced).eod_id) == (0, 3)


def test_round_trip_bos_eos_and_metadata(tmp_path, tok_dir):
    summary, out = preprocess_docs(tmp_path, tok_dir, workers=0)
    ds = open_dataset(out, verify=True)
    assert ds.num_documents == len(DOCS) and (ds.bos_id, ds.eod_id, ds.vocab_size) == (0, 1, 300)
    for i, text in enumerate(DOCS):
        ids = ds.document(i)
        assert ids[0] == 0 and ids[-1] == 1 and not np.isin(ids[1:-1], [0, 1]).any()
        np.testing.assert_array_equal(ids[1:-1], ds.tokenizer.encode(text))
        assert ds.text(i) == text
    meta = json.loads((out / "metadata.json").read_text())["tokenizer"]
    assert meta["kind"] == "tokenizers" and meta["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert meta["sha256"] == file_sha256(tok_dir / "tokenizer.json") and meta["source"] == str(tok_dir)
    assert (meta["vocab_size"], meta["bos_id"], meta["eod_id"]) == (300, 0, 1)
    assert [p.name for p in ds.tokenizer_files] == meta["files"] and all(p.parent == out for p in ds.tokenizer_files)
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    info = describe_data(DataConfig(kind="files", path=str(out)))
    assert (info.bos_id, info.eod_id, info.tokenizer_sha256) == (0, 1, meta["sha256"])
    # Worker processes (pickled tokenizer, small batches) write the same bytes.
    _, again = preprocess_docs(tmp_path, tok_dir, name="w2", workers=2, batch_bytes=40)
    assert (again / "tokens.bin").read_bytes() == (out / "tokens.bin").read_bytes()
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace('"<pad>"', '"<pud>"'))
    with pytest.raises(StoreError, match=r"tokenizer\.json does not match"):
        _ = open_dataset(out).tokenizer


def test_transformers_save_pretrained_directory(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=train_bpe(bos_template=True), bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
    hf.save_pretrained(tmp_path / "hf")
    _, out = preprocess_docs(tmp_path, tmp_path / "hf", workers=0)
    ds = open_dataset(out)
    reference = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for i, text in enumerate(DOCS):  # what the checkpoint's own tokenizer gives, then its eos
        assert ds.document(i).tolist() == reference(text)["input_ids"] + [reference.eos_token_id]
        assert ds.text(i) == text
    assert ds.vocab_size == len(reference)


def test_sentencepiece_directory_keeps_hf_conventions(tmp_path):
    _, plain = preprocess_docs(tmp_path, None, name="sp", docs=DOCS * 30)  # trains a sentencepiece model
    model = tmp_path / "spdir"
    model.mkdir()
    shutil.copy(plain / "tokenizer.model", model)
    (model / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                             "eos_token": "</s>"}))
    _, out = preprocess_docs(tmp_path, model, name="spout", workers=0)
    ds = open_dataset(out)
    assert ds.tokenizer.kind == "sentencepiece" and ds.bos_id == ds.tokenizer.sp.bos_id()
    assert ds.document(0)[0] == ds.bos_id and ds.document(0)[-1] == ds.eod_id and ds.text(0) == DOCS[0]
    assert open_dataset(plain).bos_id is None and open_dataset(plain).document(0)[0] != ds.bos_id


@pytest.mark.parametrize("case", ["missing_json", "missing_dir", "bad_config_json", "no_tokenizer", "bad_json",
                                  "unknown_eos", "no_eos"])
def test_errors_name_the_path(tmp_path, tok_dir, case):
    bad = tmp_path / "bad"
    if case in ("bad_config_json", "bad_json", "unknown_eos", "no_eos"):
        shutil.copytree(tok_dir, bad)
    elif case == "no_tokenizer":
        bad.mkdir()
        (bad / "config.json").write_text("{}")
    if case == "bad_config_json":
        (bad / "tokenizer_config.json").write_text("{not json")
    if case == "bad_json":
        (bad / "tokenizer.json").write_text('{"version": "1.0"}')
    if case == "unknown_eos":
        (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    if case == "no_eos":
        (bad / "tokenizer_config.json").write_text("{}")
    target = {"missing_json": bad / "tokenizer.json"}.get(case, bad)
    expected = {"missing_json": r"bad/tokenizer\.json does not exist", "missing_dir": "bad does not exist",
                "bad_config_json": r"bad/tokenizer_config\.json is not readable JSON",
                "no_tokenizer": r"bad holds neither tokenizer\.json nor tokenizer\.model",
                "bad_json": r"bad/tokenizer\.json is not a Hugging Face tokenizer\.json",
                "unknown_eos": r"bad/tokenizer_config\.json: eos_token '<\|im_end\|>' is not in the vocabulary",
                "no_eos": "bad: no end-of-document token"}[case]
    with pytest.raises(TokenizerError, match=expected):
        load_tokenizer(target)
    with pytest.raises(TokenizerError, match=expected):
        preprocess_docs(tmp_path, target)
    assert not (tmp_path / "out").exists()


def test_stores_of_the_older_format_still_open(tmp_path):
    _, out = preprocess_docs(tmp_path, None, name="sp", docs=DOCS * 30)
    meta = json.loads((out / "metadata.json").read_text())
    tok = meta["tokenizer"]
    meta["tokenizer"] = {k: tok[k] for k in ("file", "sha256", "vocab_size", "eod_id", "source")}
    (out / "metadata.json").write_text(json.dumps(meta))
    ds = open_dataset(out)
    assert ds.bos_id is None and ds.tokenizer.kind == "sentencepiece" and ds.text(1) == DOCS[1]
    assert [p.name for p in ds.tokenizer_files] == ["tokenizer.model"]
