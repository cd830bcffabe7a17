"""A small Llama taught to retrieve a passkey at short context, for the README's heatmap.

    python -m tools.passkey_demo OUT [--train-len 256] [--steps 1000]
    megaring-eval model.init_from=OUT tasks=[passkey] eval_tasks.passkey.lengths=[128,256,512,1024,2048] \\
        eval_tasks.passkey.samples=4 parallel.cp=2 parallel.nproc_per_node=auto hydra.run.dir=runs/passkey-demo

Builds the random Llama and byte-level tokenizer of :mod:`tools.bench_eval` (``max_position_embeddings``
2048), then trains it with transformers in one process on passkey cases of ``--train-len`` tokens or
fewer (megaring's own case builder, keys seeded apart from the evaluation's seed 0), the loss on every
token plus, once more, on the answer's. The model retrieves inside the lengths it was trained on and,
beyond them, only keys near the question (docs/img/passkey_heatmap.png is the command above's eval.png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TRAIN_SEED = 1_000  # the evaluation's cases use eval_tasks.passkey.seed=0


def train(out: Path, train_len: int, steps: int, batch: int, dim: int, layers: int) -> None:
    import torch
    import transformers

    from megaring.retrieval.cases import Encoder, passkey_case
    from tools.bench_eval import build_model

    build_model(out, 2048, dim, layers)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    enc = Encoder(lambda t: tok(t, add_special_tokens=False)["input_ids"], tok.convert_tokens_to_ids("<s>"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.3)
    rng = np.random.default_rng(TRAIN_SEED)
    torch.manual_seed(TRAIN_SEED)
    for step in range(steps):
        length = int(rng.integers(train_len // 2, train_len + 1))
        cases = [passkey_case(enc, length, float(rng.uniform()), TRAIN_SEED + step * batch + i, seed=TRAIN_SEED,
                              key_digits=5) for i in range(batch)]
        ids = torch.as_tensor(np.stack([c.ids for c in cases]))  # (B, L)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, L-1, V): token t+1 from tokens <= t
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
        answer = torch.zeros_like(losses, dtype=torch.bool)
        for row, case in enumerate(cases):
            answer[row, -case.answer_len:] = True
        # every token: the repeated filler and the key's second mention teach copying (induction) faster
        # than the few answer tokens alone
        loss = losses.mean() + losses[answer].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {losses.mean().item():.3f}, answer loss {losses[answer].mean().item():.3f}",
                  flush=True)
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    train(args.out, args.train_len, args.steps, args.batch, args.dim, args.layers)


if __name__ == "__main__":
    main()
