"""Benchmark instruction tuning's two costs (not a timed test).

``preprocess``: the same conversations tokenized two ways by ``megaring-preprocess`` in this
process (``workers=0``, one worker): as chat records (``format=chat``: the checkpoint's chat
template rendered once per assistant turn for the loss mask) and as plain text records (the
conversation's text joined, ``format=text``). Reports tokens/s per worker of each, median over
alternating rounds, and the median ratio chat / text.

``step``: the step time of a masked SFT step against a plain step at the same shape: two token
stores with the same documents, one with a loss mask (a long untrained prompt, a short trained
answer), one without; a one-process run of each (ZeRO-1, float32), alternating over rounds.
Reports the median ``step_time_s`` over the steps after the first two of each run, and the median
ratio masked / plain.

    python -m tools.bench_sft preprocess --conversations 400 --rounds 3
    python -m tools.bench_sft step --seq-len 512 --steps 12 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from megaring.data import PreprocessConfig, TokenizerConfig
from megaring.data.preprocess import preprocess
from megaring.data.stdlib_corpus import stdlib_sources
from tools.rounds import median_ratio

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKERS = ["<|im_start|>", "<|im_end|>"]


def conversations(n: int) -> list[list[dict]]:
    """``n`` conversations of two user / assistant exchanges, cut from standard-library files."""
    files = [f for repo in stdlib_sources() for f in repo.files]
    out = []
    for i in range(n):
        text = files[i % len(files)].read_text(errors="replace")[:4000]
        q = len(text) // 4
        # stripped, as chat data is: an answer starting with a newline would merge with the header's
        parts = [p.strip() or "." for p in (text[:q], text[q:2 * q], text[2 * q:3 * q], text[3 * q:])]
        out.append([{"role": r, "content": c} for r, c in zip(("user", "assistant") * 2, parts)])
    return out


def tokenizer_dir(path: Path, texts: list[str]) -> Path:
    """A byte-level BPE (4096 ids) trained on ``texts``, with ChatML markers and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>", *MARKERS],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML}))
    return path


def _preprocess_once(corpus: Path, out: Path, model: Path, fmt: str) -> float:
    """Tokens/s of one ``megaring-preprocess`` of ``corpus`` (one worker, in this process)."""
    cfg = PreprocessConfig(input=str(corpus), output=str(out), progress=False, workers=0, format=fmt,
                           tokenizer=TokenizerConfig(model=str(model)), overwrite=True)
    start = time.perf_counter()
    summary = preprocess(cfg)
    return summary["tokens"] / (time.perf_counter() - start)


def bench_preprocess(args) -> None:
    convs = conversations(args.conversations)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tokenizer_dir(tmp / "tok", [m["content"] for c in convs[:50] for m in c])
        chat, text = tmp / "chat.jsonl", tmp / "text.jsonl"
        chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
        text.write_text("".join(json.dumps({"text": "\n".join(m["content"] for m in c)}) + "\n" for c in convs))
        pairs = []
        for _ in range(args.rounds):
            pairs.append((_preprocess_once(chat, tmp / "chat", model, "chat"),
                          _preprocess_once(text, tmp / "text", model, "text")))
    print(f"{len(convs)} conversations, {args.rounds} rounds, one worker (workers=0)")
    print(f"chat: {statistics.median(p[0] for p in pairs):,.0f} tokens/s per worker")
    print(f"text: {statistics.median(p[1] for p in pairs):,.0f} tokens/s per worker")
    print(f"chat / text: {median_ratio(pairs):.3f} (median of {args.rounds} paired rounds)")


def _run_steps(store: Path, run_dir: Path, args) -> list[float]:
    """``step_time_s`` of the steps after the first two of a one-process run on ``store``."""
    from megaring.ops.spawn import launch
    from megaring.train.metrics import read_metrics
    from tests.helpers.train_cfg import compose_cfg

    cfg = compose_cfg("model=tiny", "data=files", f"data.path={store}", f"trainer.seq_len={args.seq_len}",
                      f"trainer.global_batch_size={args.batch}", f"trainer.max_steps={args.steps}",
                      "logging.wandb.mode=disabled", "logging.progress_bar=false",
                      f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.ffn_dim={4 * args.dim}")
    status = launch(cfg, run_dir)
    if status != 0:
        raise SystemExit(f"the run in {run_dir} failed (exit {status})")
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "step_time_s" in m]
    return [m["step_time_s"] for m in steps[2:]]


def bench_step(args) -> None:
    from megaring.data import write_tokenized
    from tests.helpers.sft_data import masked_documents

    vocab = 256
    docs, masks = masked_documents(args.docs, vocab, prompt=(200, 1200), answer=(20, 200))
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tokenized(tmp / "masked", docs, vocab_size=vocab, eod_id=vocab - 1, masks=masks)
        write_tokenized(tmp / "plain", docs, vocab_size=vocab, eod_id=vocab - 1)
        for r in range(args.rounds):
            masked = statistics.median(_run_steps(tmp / "masked", tmp / f"m{r}", args))
            plain = statistics.median(_run_steps(tmp / "plain", tmp / f"p{r}", args))
            pairs.append((masked, plain))
            print(f"round {r}: masked {masked * 1e3:.1f} ms, plain {plain * 1e3:.1f} ms", flush=True)
    print(f"seq_len {args.seq_len}, global batch {args.batch}, dim {args.dim}, {args.layers} layers, "
          f"{args.steps} steps per run (the first two left out), {args.rounds} rounds")
    print(f"masked step: {statistics.median(p[0] for p in pairs) * 1e3:.1f} ms, "
          f"plain step: {statistics.median(p[1] for p in pairs) * 1e3:.1f} ms, "
          f"masked / plain: {median_ratio(pairs):.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("preprocess")
    p.add_argument("--conversations", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(fn=bench_preprocess)
    s = sub.add_parser("step")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--dim", type=int, default=256)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--docs", type=int, default=400)
    s.add_argument("--rounds", type=int, default=3)
    s.set_defaults(fn=bench_step)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
