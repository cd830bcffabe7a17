"""Retrieval evaluation (``passkey``, ``needle``): cases of exact length with the answer last, greedy
teacher-forced scoring on the mesh that equals transformers on the saved cases, the same
predictions and scores at every layout, and config errors that list every problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from megaring.errors import ConfigError
from megaring.retrieval.cases import CaseError, Encoder, needle_case, passkey_case
from megaring.train.config_checks import validate
from tests.helpers.train_cfg import make_cfg
from tests.unit.test_data_tokenizers import write_tokenizer_dir

VOCAB = 301  # the test tokenizer's 300 ids, odd so that tp=2 pads the vocabulary
LENGTHS = (384, 512)


def llama_with_tokenizer(directory: Path) -> Path:
    """A random Llama (GQA, untied head) long enough for the cases, with the test BPE tokenizer."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                                   rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # sharper logits than the default init: fewer near-ties in the argmax
    write_tokenizer_dir(directory)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return llama_with_tokenizer(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def encoder(hf) -> Encoder:
    from megaring.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hf)
    return Encoder(tok.encode, tok.bos_id)


def test_cases_have_their_length_the_key_at_its_depth_and_the_answer_last(hf, encoder):
    from megaring.data.tokenizer import load_tokenizer
    from megaring.retrieval.cases import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION

    decode = load_tokenizer(hf).decode

    for depth in (0.0, 0.5, 1.0):
        case = passkey_case(encoder, 512, depth, 1, seed=3, key_digits=5)
        again = passkey_case(encoder, 512, depth, 1, seed=3, key_digits=5)
        assert len(case.ids) == 512 and np.array_equal(case.ids, again.ids)  # seeded per case
        assert case.ids[0] == encoder.bos_id
        answer = case.ids[-case.answer_len:].tolist()
        text = decode(answer)
        assert len(text) == 6 and text[0] == " " and text[1:].isdigit() and encoder.encode(text) == answer
        question = encoder.encode(PASSKEY_QUESTION)
        assert case.ids[-case.answer_len - len(question):-case.answer_len].tolist() == question
        needle = encoder.encode(PASSKEY_NEEDLE.format(key=text[1:]))
        starts = [i for i in range(len(case.ids)) if case.ids[i:i + len(needle)].tolist() == needle]
        assert len(starts) == 1
        head = 1 + len(encoder.encode(PASSKEY_INTRO))  # BOS and the instruction
        room = 512 - head - len(needle) - len(question) - len(answer)  # the filler's tokens
        unit = len(encoder.encode(PASSKEY_FILLER))
        assert starts[0] - head == min(room, unit * round(depth * room / unit))  # at a sentence boundary
    keys = {tuple(passkey_case(encoder, 512, 0.5, s, seed=3, key_digits=5).ids[-6:]) for s in range(4)}
    assert len(keys) == 4
    haystack = np.arange(2000) % 250 + 20
    case = needle_case(encoder, haystack, 512, 0.25, 0, seed=0, distractors=3)
    assert len(case.ids) == 512
    with pytest.raises(CaseError, match="use lengths of at least"):
        passkey_case(encoder, 40, 0.5, 0, seed=0, key_digits=5)
    with pytest.raises(CaseError, match="haystack tokens"):
        needle_case(encoder, haystack[:100], 512, 0.5, 0, seed=0, distractors=1)


def test_chat_cases_put_the_context_in_the_user_turn_and_the_answer_after_the_generation_prompt(tmp_path):
    import transformers

    from megaring.data.tokenizer import load_tokenizer
    from megaring.retrieval.cases import chat_encoder
    from tests.unit.test_data_chat import CHATML, chat_dir

    directory = chat_dir(tmp_path / "chat", CHATML)
    tok = load_tokenizer(directory)
    case = passkey_case(chat_encoder(str(directory), tok.encode, tok.bos_id), 512, 0.5, 0, seed=0, key_digits=5)
    text = transformers.AutoTokenizer.from_pretrained(directory).decode(case.ids.tolist())
    answer = tok.decode(case.ids[-case.answer_len:].tolist())
    assert len(case.ids) == 512 and text.startswith("<|im_start|>user\nA number is hidden")
    assert text.endswith("The pass key is<|im_end|>\n<|im_start|>assistant\n" + answer), text[-120:]


def test_bad_retrieval_settings_are_config_errors_listing_each():
    cfg = make_cfg(cp=2, extra=("eval.every=1", "eval.tasks=[passkey, needle]", "data.valid_fraction=0.05",
                                "eval_tasks.passkey.depths=[0.5, 1.5, -0.1]", "eval_tasks.passkey.lengths=[66, 4096]",
                                "model.max_position_embeddings=2048", "eval_tasks.passkey.samples=0",
                                "eval_tasks.needle.distractors=40"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2)
    msg = str(err.value)
    for line in ("eval_tasks.passkey.depths=[0.5, 1.5, -0.1]: depths are fractions of the context in [0, 1] "
                 "(outside: [1.5, -0.1])",
                 "eval_tasks.passkey.samples=0 must be >= 1",
                 "eval_tasks.passkey.lengths: 66 does not fit this layout",
                 "eval_tasks.passkey.lengths: 4096 is longer than the model can hold (model.max_position_embeddings=2048)",
                 "eval_tasks.needle.distractors=40 must be in 0-15",
                 "the needle task hides its facts in real text: set data.path"):
        assert line in msg, msg


def _evaluate(rank: int, world_size: int, cfg, run_dir: str) -> list[dict]:
    from megaring.train.trainer import train

    return train(cfg, run_dir)


def retrieval_cfg(hf: Path, dp=1, cp=1, tp=1, *extra: str):
    return make_cfg(dp=dp, cp=cp, tp=tp, micro_batch_size=4 // dp, extra=(
        "data=mock", f"data.vocab_size={VOCAB}", "data.num_tokens=20000", "data.mean_doc_len=150",
        f"model.init_from={hf}", "trainer.max_steps=0", "eval.every=1", "eval.batches=1", "data.valid_fraction=0.2",
        "eval.tasks=[passkey]", f"eval_tasks.passkey.lengths=[{', '.join(map(str, LENGTHS))}]",
        "eval_tasks.passkey.depths=[0, 0.5, 1]", "eval_tasks.passkey.samples=2", "eval_tasks.passkey.save_cases=true",
        *extra))


def saved_cases(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "cases" / "passkey.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(pools, hf, tmp_path_factory) -> tuple[dict, list[dict]]:
    run_dir = tmp_path_factory.mktemp("ref")
    (history,) = pools(1).run(_evaluate, retrieval_cfg(hf, 1, 1, 1, "eval_tasks.passkey.batch_size=4"), str(run_dir))
    (record,) = history
    return record, saved_cases(run_dir)


@pytest.mark.slow
def test_passkey_scores_and_predictions_equal_transformers_on_the_saved_cases(hf, reference):
    import transformers

    record, cases = reference
    assert len(cases) == len(LENGTHS) * 3 * 2 and {len(c["input_ids"]) for c in cases} == set(LENGTHS)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    right = 0
    for case in cases:
        ids, n = torch.tensor([case["input_ids"]]), case["answer_len"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        guess = logits[-n - 1:-1].argmax(-1)
        assert case["predicted"] == guess.tolist(), case["length"]
        assert case["score"] == (guess == ids[0, -n:]).double().mean().item()
        right += int((guess == ids[0, -n:]).sum())
    cells = {(c["length"], c["depth"]) for c in cases}
    assert {k for k in record if k.startswith("eval/passkey/")} == {f"eval/passkey/{L}/{d:g}" for L, d in cells}
    mean = np.mean([np.mean([c["score"] for c in cases if (c["length"], c["depth"]) == cell]) for cell in cells])
    assert record["eval/passkey"] == pytest.approx(mean, abs=1e-12)
    assert right > 0  # some answer tokens are predicted: the comparison covers right and wrong guesses


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, 2, 1, 2, "zigzag", 1), (2, 2, 1, 1, "zigzag", 1),
                                    (1, 2, 2, 1, "balanced", 3), (1, 4, 1, 2, "zigzag", 2)],
                         ids=lambda t: "dp{}cp{}tp{}ulysses{}-{}-batch{}".format(*t))
def test_passkey_predictions_are_the_same_at_every_layout(pools, hf, reference, tmp_path, layout):
    dp, cp, tp, ulysses, kind, batch = layout
    cfg = retrieval_cfg(hf, dp, cp, tp, f"parallel.ulysses={ulysses}", f"parallel.layout={kind}",
                        f"eval_tasks.passkey.batch_size={batch}")
    (record, *_), *_ = pools(dp * cp * tp).run(_evaluate, cfg, str(tmp_path))
    want_record, want = reference
    got = saved_cases(tmp_path)
    assert [c["predicted"] for c in got] == [c["predicted"] for c in want]
    assert [c["score"] for c in got] == [c["score"] for c in want]
    assert {k: v for k, v in record.items() if k.startswith("eval/passkey")} == \
        {k: v for k, v in want_record.items() if k.startswith("eval/passkey")}


def megaring(module: str, *args: str, timeout: float = 240):
    import subprocess
    import sys

    from tests.helpers.cli import clean_env

    cmd = [sys.executable, "-c", f"import sys; from {module} import main; sys.argv[0] = {module!r}; main()", *args]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


EVAL_ARGS = ("data=mock", f"data.vocab_size={VOCAB}", "data.num_tokens=20000", "data.mean_doc_len=150",
             "data.valid_fraction=0.2", "trainer.seq_len=128", "trainer.global_batch_size=4", "eval.batches=1",
             "logging.wandb.mode=disabled", "logging.progress_bar=false", "parallel.timeout_s=60",
             "eval_tasks.passkey.lengths=[384,512]", "eval_tasks.passkey.depths=[0,1]",
             "eval_tasks.passkey.save_cases=true")


@pytest.mark.slow
def test_megaring_eval_of_a_checkpoint_at_another_layout_equals_one_process_and_the_export(hf, tmp_path):
    """Train 2 steps at dp=2 ZeRO-2 from the Llama, then ``megaring-eval checkpoint=<run>`` at cp=2
    and at one process: the same records, and the cases' predictions are transformers' on the export."""
    from tests.helpers.cli import ok

    run = tmp_path / "train"
    ok(megaring("megaring.cli.train", *EVAL_ARGS, f"model.init_from={hf}", "trainer.max_steps=2",
                "parallel.dp=2", "parallel.zero_stage=2", "parallel.nproc_per_node=2", "optim.lr=0.01",
                f"hydra.run.dir={run}"))
    results = {}
    for name, layout in (("one", ()), ("cp2", ("parallel.cp=2", "parallel.nproc_per_node=2"))):
        out = tmp_path / name
        proc = megaring("megaring.cli.eval", f"checkpoint={run}", "tasks=[passkey,position_loss]", *EVAL_ARGS,
                        *layout, f"hydra.run.dir={out}")
        ok(proc)
        assert "passkey (score" in proc.stdout and "position_loss (mean next-token loss" in proc.stdout, proc.stdout
        records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        assert (out / "eval.png").stat().st_size > 0
        results[name] = records, saved_cases(out)
    (one, one_cases), (cp2, cp2_cases) = results["one"], results["cp2"]
    assert {r["task"] for r in one} == {"passkey", "position_loss", "loss", "run"}
    assert [r["world_size"] for r in one + cp2 if r["task"] == "run"] == [1, 2]
    assert [(r["task"], r.get("length"), r.get("depth"), r.get("score")) for r in one] == \
        [(r["task"], r.get("length"), r.get("depth"), r.get("score")) for r in cp2]
    np.testing.assert_allclose([r["loss"] for r in one if "loss" in r], [r["loss"] for r in cp2 if "loss" in r],
                               rtol=1e-6)
    assert [c["predicted"] for c in one_cases] == [c["predicted"] for c in cp2_cases]

    import transformers

    exported = tmp_path / "hf"
    ok(megaring("megaring.cli.export", f"input={run}", f"output={exported}", "dtype=float32"))
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32,
                                                              attn_implementation="eager")
    for case in one_cases:
        ids, n = torch.tensor([case["input_ids"]]), case["answer_len"]
        with torch.no_grad():
            guess = model(input_ids=ids).logits[0, -n - 1:-1].argmax(-1)
        assert case["predicted"] == guess.tolist()


def test_megaring_eval_refuses_bad_input_before_any_process_starts(hf, tmp_path):
    proc = megaring("megaring.cli.eval", f"model.init_from={hf}", "tasks=[passkey,needles]",
                    "eval_tasks.passkey.depths=[2]", "parallel.cp=2", "eval_tasks.passkey.lengths=[511]",
                    f"hydra.run.dir={tmp_path / 'out'}", "logging.wandb.mode=disabled")
    assert proc.returncode == 2, proc.stderr
    for line in ("tasks= names ['needles']", "eval_tasks.passkey.depths=[2.0]",
                 "eval_tasks.passkey.lengths: 511 does not fit this layout"):
        assert line in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    from megaring.cli.eval import EvalArgs, checkpoint_step_dir

    with pytest.raises(ConfigError, match="does not exist"):
        checkpoint_step_dir(EvalArgs(checkpoint=str(tmp_path / "nowhere")), None)
    with pytest.raises(ConfigError, match="both name the model"):
        checkpoint_step_dir(EvalArgs(checkpoint=str(tmp_path)), str(hf))
    with pytest.raises(ConfigError, match="holds no megaring checkpoint"):
        checkpoint_step_dir(EvalArgs(checkpoint=str(tmp_path)), None)


WORDS = ("the old mill stood by a slow river where farmers brought grain each autumn and the miller kept "
         "careful books of every sack").split()


@pytest.mark.slow
def test_needle_cases_hide_facts_in_the_store_text_and_score_like_transformers(pools, hf, tmp_path):
    from megaring.data import PreprocessConfig, TokenizerConfig, open_dataset
    from megaring.data.preprocess import preprocess

    rng = np.random.default_rng(0)
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=120)) + "."}) + "\n"
                              for _ in range(60)))
    store = tmp_path / "store"
    preprocess(PreprocessConfig(input=str(corpus), output=str(store), progress=False, workers=0,
                                tokenizer=TokenizerConfig(model=str(hf))))
    cfg = make_cfg(cp=2, micro_batch_size=4, extra=(
        f"data.path={store}", "data.kind=files", f"model.init_from={hf}", "trainer.max_steps=0", "eval.every=1",
        "eval.batches=1", "data.valid_fraction=0.2", "eval.tasks=[needle]", "eval_tasks.needle.lengths=[512]",
        "eval_tasks.needle.depths=[0, 0.5, 1]", "eval_tasks.needle.samples=1", "eval_tasks.needle.save_cases=true",
        "eval_tasks.needle.distractors=2"))
    (record, *_), *_ = pools(2).run(_evaluate, cfg, str(tmp_path / "run"))
    cases = [json.loads(line) for line in (tmp_path / "run" / "cases" / "needle.jsonl").read_text().splitlines()]
    assert len(cases) == 3 and record["eval/needle"] == pytest.approx(np.mean([c["score"] for c in cases]))
    from megaring.data.tokenizer import load_tokenizer
    from megaring.retrieval.cases import NEEDLE_INTRO

    decode, text = load_tokenizer(hf).decode, open_dataset(store).read(0, 400)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    for case in cases:
        ids, n = case["input_ids"], case["answer_len"]
        assert len(ids) == 512
        facts = re.findall(r" The special magic number for (\w+) is: (\d+)\.", decode(ids))
        assert len(facts) == 3 and len({name for name, _ in facts}) == 3  # the needle and 2 distractors
        asked = re.search(r"What is the special magic number for (\w+)\?", decode(ids)).group(1)
        assert decode(ids[-n:]) == " " + dict(facts)[asked]  # the answer is the asked name's number
        plain = re.sub(r" The special magic number for \w+ is: \d+\.", "", decode(ids))
        assert plain.startswith(NEEDLE_INTRO + decode(text[:200]))  # the haystack is the store's own text
        with torch.no_grad():
            guess = model(input_ids=torch.tensor([ids])).logits[0, -n - 1:-1].argmax(-1)
        assert case["predicted"] == guess.tolist()
