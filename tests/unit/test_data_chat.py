"""Chat and prompt/completion preprocessing: ids from the checkpoint's own chat template, loss masks
by the incremental-rendering rule, the mask in the store, bad records."""

import json

import numpy as np
import pytest

from megaring.data import PreprocessConfig, TokenizerConfig, open_dataset
from megaring.data.chat import load_chat_tokenizer
from megaring.data.config import LossMaskConfig
from megaring.data.preprocess import PreprocessError, preprocess, verify_main
from megaring.data.sources import InputError
from megaring.data.store import MASK_NAME
from megaring.data.tokenizer import TokenizerError
from tests.unit.test_data_tokenizers import train_bpe

transformers = pytest.importorskip("transformers")

MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "[INST]", "[/INST]"]
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
# Each template's trained text of an answer: the answer and its end-of-turn marker.
ANSWER_TEXT = {"llama3": "{}<|eot_id|>", "chatml": "{}<|im_end|>\n", "mistral": "{}</s>"}
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "mistral": MISTRAL}
CONVERSATION = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"},
                {"role": "user", "content": "short"}, {"role": "assistant", "content": "jumps over the dog"}]


def chat_dir(path, template: str | None, *, as_file: bool = False):
    """A local Hugging Face tokenizer directory (or one added to a model directory) with the chat
    markers as special tokens."""
    path.mkdir(parents=True, exist_ok=True)
    tk = train_bpe(False)
    tk.add_special_tokens(MARKERS)
    tk.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template and not as_file:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if template and as_file:
        (path / "chat_template.jinja").write_text(template)
    return path


def run(tmp_path, model, records, name="out", **kw):
    corpus = tmp_path / f"{name}.jsonl"
    corpus.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    tok = TokenizerConfig(model=str(model), chat_template=kw.pop("chat_template", None))
    cfg = PreprocessConfig(input=str(corpus), output=str(tmp_path / name), progress=False, workers=0,
                           tokenizer=tok, **kw)
    return preprocess(cfg), tmp_path / name


def trained_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """The maximal runs of trained ids, in order."""
    runs, current = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_masks_follow_the_incremental_rendering_rule(tmp_path, name):
    model = chat_dir(tmp_path / "tok", TEMPLATES[name], as_file=name == "chatml")
    summary, out = run(tmp_path, model, [{"messages": CONVERSATION}])
    hf = load_chat_tokenizer(str(model))
    want = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    ds = open_dataset(out)
    ids, mask = ds.document(0), ds.read_mask(0, ds.num_tokens)
    eod = hf.convert_tokens_to_ids("</s>")
    assert ids.tolist() == (want if want[-1] == eod else want + [eod])  # exactly transformers' ids (+ EOD)
    runs = [hf.decode(r) for r in trained_runs(ids, mask)]
    answers = [ANSWER_TEXT[name].format(m["content"]) for m in CONVERSATION if m["role"] == "assistant"]
    if want[-1] != eod:
        answers[-1] += "</s>"  # the appended end-of-document id follows a trained token
    assert runs == answers
    assert summary["format"] == "chat" and summary["conversations"] == 1
    assert summary["trained_tokens"] == int(mask.sum()) < ds.num_tokens


def test_train_on_last_assistant_and_all(tmp_path):
    model = chat_dir(tmp_path / "tok", CHATML)
    _, last = run(tmp_path, model, [{"messages": CONVERSATION}], name="last",
                  data=LossMaskConfig(train_on="last_assistant"))
    _, every = run(tmp_path, model, [{"messages": CONVERSATION}], name="all", data=LossMaskConfig(train_on="all"))
    ds = open_dataset(last)
    hf = load_chat_tokenizer(str(model))
    assert [hf.decode(r) for r in trained_runs(ds.document(0), ds.read_mask(0, ds.num_tokens))] == [
        "jumps over the dog<|im_end|>\n</s>"]
    ds = open_dataset(every)
    assert ds.read_mask(0, ds.num_tokens).all()


def test_store_counts_verify_and_mask_corruption(tmp_path, capsys):
    model = chat_dir(tmp_path / "tok", CHATML)
    records = [{"messages": CONVERSATION}, {"messages": []}, {"messages": CONVERSATION * 8}]
    summary, out = run(tmp_path, model, records, max_doc_tokens=200)
    assert summary["dropped"] == {"empty": 1, "no_assistant": 0, "too_long": 1}
    assert summary["conversations"] == 1 and json.loads((out / "metadata.json").read_text())["trained_tokens"] > 0
    assert verify_main(str(out)) == 0 and "loss mask" in capsys.readouterr().out
    raw = bytearray((out / MASK_NAME).read_bytes())
    raw[3] ^= 1
    (out / MASK_NAME).write_bytes(bytes(raw))
    assert verify_main(str(out)) == 1 and "tokens.mask is corrupted" in capsys.readouterr().err


def test_prompt_completion_trains_the_completion_and_eod(tmp_path):
    model = chat_dir(tmp_path / "tok", None)
    summary, out = run(tmp_path, model, [{"prompt": "hello world", "completion": " the quick fox"}])
    ds = open_dataset(out)
    ids, mask = ds.document(0), ds.read_mask(0, ds.num_tokens)
    assert summary["format"] == "prompt_completion"
    assert ds.tokenizer.decode(ids[mask]) == " the quick fox" and ids[-1] == ds.eod_id and mask[-1]
    assert ds.tokenizer.decode(ids[~mask]) == "hello world"


BAD = {"missing_messages": ({"text": "x"}, "no 'messages' field"),
       "unknown_role": ({"messages": [{"role": "robot", "content": "x"}]}, "message 0 has role 'robot'"),
       "non_string": ({"messages": [{"role": "user", "content": 3}]}, "message 0 content is int"),
       "no_assistant": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message")}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_name_the_line_or_are_counted(tmp_path, case):
    model = chat_dir(tmp_path / "tok", CHATML)
    record, message = BAD[case]
    good = {"messages": CONVERSATION}
    with pytest.raises(InputError, match=f"out.jsonl:2: .*{message}"):
        run(tmp_path, model, [good, record], format="chat")
    summary, _ = run(tmp_path, model, [good, record], name="skip", format="chat", skip_bad_lines=True)
    assert summary["skipped_records"] == 1 and summary["dropped"]["no_assistant"] == (case == "no_assistant")


def test_missing_template_names_the_directory_and_a_file_supplies_one(tmp_path):
    model = chat_dir(tmp_path / "tok", None)
    with pytest.raises(TokenizerError, match=f"{model} has no chat template.*tokenizer.chat_template"):
        run(tmp_path, model, [{"messages": CONVERSATION}])
    (tmp_path / "t.jinja").write_text(CHATML)
    summary, _ = run(tmp_path, model, [{"messages": CONVERSATION}], name="ok", chat_template=str(tmp_path / "t.jinja"))
    assert summary["conversations"] == 1


def test_non_prefix_template_names_the_message(tmp_path):
    odd = CHATML.replace("{% if add_generation_prompt %}<|im_start|>assistant", "{% if add_generation_prompt %}"
                         "<|im_start|>model")
    model = chat_dir(tmp_path / "tok", odd)
    with pytest.raises(InputError, match="message 1: the chat template's renderings are not prefixes"):
        run(tmp_path, model, [{"messages": CONVERSATION}])


def test_masked_format_needs_a_tokenizer_model(tmp_path):
    with pytest.raises(PreprocessError, match="format=chat needs tokenizer.model"):
        preprocess(PreprocessConfig(input=str(tmp_path), output=str(tmp_path / "o"), format="chat"))


def test_parquet_conversations_give_the_store_of_the_same_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = chat_dir(tmp_path / "tok", CHATML)
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}]
    _, from_jsonl = run(tmp_path, model, records, name="jsonl")
    pq.write_table(pa.table({"messages": [r["messages"] for r in records]}), tmp_path / "chat.parquet")
    cfg = PreprocessConfig(input=str(tmp_path / "chat.parquet"), output=str(tmp_path / "pq"), progress=False,
                           workers=0, tokenizer=TokenizerConfig(model=str(model)))
    summary = preprocess(cfg)
    assert summary["format"] == "chat" and summary["conversations"] == 2  # format=auto saw the messages column
    a, b = open_dataset(from_jsonl), open_dataset(tmp_path / "pq")
    assert np.array_equal(a.document(0), b.document(0)) and np.array_equal(a.document(1), b.document(1))
    assert np.array_equal(a.read_mask(0, a.num_tokens), b.read_mask(0, b.num_tokens))
