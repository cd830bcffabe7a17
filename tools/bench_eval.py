"""Benchmark ``megaring-eval``'s passkey grid at cp against the same cases through transformers on one process.

    python -m tools.bench_eval [--lengths 1024 2048 4096 8192 16384] [--cp 4] [--dim 64 --layers 2]

Builds a random Llama (GQA, ``max_position_embeddings`` = the longest length) with a byte-level BPE
tokenizer trained here, then in one run:

1. ``megaring-eval model.init_from=<it> tasks=[passkey]`` at ``parallel.cp=<cp>`` (a 5 depths x
   lengths grid, one case per cell, ``save_cases=true``): the command's wall time (process start
   included), the evaluation's own time and the largest rank's peak memory (as the command reports
   them);
2. the saved cases through ``transformers`` (float32, SDPA attention) in one process: the time of
   the forwards alone, the process's peak memory, and whether every case's greedy answer tokens equal
   megaring's.

Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = ("A number is hidden somewhere in the long text below. Find it and keep it in mind: you will be asked "
        "for it at the end. The river runs down to the sea. The hills are quiet today. Rain falls and the "
        "fields grow. The pass key is 12345. Keep it in mind. 67890 is the pass key. What is the pass key?")


def build_model(directory: Path, longest: int, dim: int, layers: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=dim, intermediate_size=2 * dim,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=longest, bos_token_id=0, eos_token_id=1,
                                   rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


def transformers_pass(model_dir: Path, cases_file: Path) -> dict:
    """Run in its own process (``--transformers``): the forwards' time, the peak RSS, the predictions."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    cases = [json.loads(line) for line in cases_file.read_text().splitlines()]
    began, predicted = time.perf_counter(), []
    with torch.no_grad():
        for case in cases:
            ids, n = torch.tensor([case["input_ids"]]), case["answer_len"]
            predicted.append(model(input_ids=ids).logits[0, -n - 1:-1].argmax(-1).tolist())
    return {"seconds": time.perf_counter() - began, "peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 2**20, "same": predicted == [c["predicted"] for c in cases], "cases": len(cases)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--transformers", nargs=2, metavar=("MODEL", "CASES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transformers:
        print(json.dumps(transformers_pass(Path(args.transformers[0]), Path(args.transformers[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        model_dir, out = Path(tmp) / "model", Path(tmp) / "eval"
        build_model(model_dir, max(args.lengths), args.dim, args.layers)
        cmd = [sys.executable, "-c", "import sys; from megaring.cli.eval import main; main()",
               f"model.init_from={model_dir}", "tasks=[passkey]", f"parallel.cp={args.cp}",
               "parallel.nproc_per_node=auto", f"eval_tasks.passkey.lengths=[{','.join(map(str, args.lengths))}]",
               "eval_tasks.passkey.samples=1", "eval_tasks.passkey.save_cases=true", "logging.wandb.mode=disabled",
               "parallel.timeout_s=600", f"hydra.run.dir={out}"]
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - began
        if proc.returncode:
            sys.exit(f"megaring-eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        run = next(r for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines()) if r["task"] == "run")
        hf = json.loads(subprocess.run([sys.executable, "-m", "tools.bench_eval", "--transformers", str(model_dir),
                                        str(out / "cases" / "passkey.jsonl")], capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    grid = f"5 depths x {len(args.lengths)} lengths ({args.lengths[0]}-{args.lengths[-1]} tokens), 1 case per cell"
    print(f"passkey grid: {grid}; model: Llama dim {args.dim}, {args.layers} layers, float32")
    print("| path | processes | time of the cases (s) | command wall time (s) | peak memory per process (GiB) |")
    print("|---|---|---|---|---|")
    print(f"| megaring-eval, cp={args.cp} | {args.cp} | {run['seconds']:.1f} (model build included) | {wall:.1f} | "
          f"{run['peak_mem_gib']:.2f} (largest rank, RSS) |")
    print(f"| transformers (SDPA) | 1 | {hf['seconds']:.1f} (forwards only) | - | {hf['peak_mem_gib']:.2f} (RSS) |")
    print(f"greedy answer tokens identical in all {hf['cases']} cases: {hf['same']}")


if __name__ == "__main__":
    main()
