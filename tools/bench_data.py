"""Benchmark the data pipeline (not a timed test).

``preprocess``: a JSONL corpus of standard-library files (repeated up to ``--mbytes``) is
encoded (a) by plain ``sentencepiece`` in this process, one thread, whole documents, and
(b) by ``megaring-preprocess`` with ``--workers`` processes (a subprocess per setting; 0 encodes
in the main process). Reports tokens/s per worker of the encoding pass against (a), wall time,
and the peak memory of the whole process tree (main + workers, sampled every 50 ms).

``shard``: one sample of ``--seq-len`` tokens from a synthetic token store; reads this cp
rank's zigzag shard at ``--cp`` against the whole sample: token bytes copied out of the memory
map and the median time.

    python -m tools.bench_data preprocess --mbytes 64 --workers 0 1 2
    python -m tools.bench_data shard --seq-len 1048576 --cp 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from megaring.data import BatchShape, DataConfig, RankShard, build_batch_reader, write_tokenized
from megaring.data.encode import PIECE_CHARS, line_pieces
from megaring.data.stdlib_corpus import stdlib_root, stdlib_sources
from megaring.data.tokenizer import SentencePieceTokenizer


def write_corpus(path: Path, mbytes: float) -> list[str]:
    """JSONL of stdlib files (one document each), repeated until ``mbytes`` MB; returns the texts."""
    files = [f for repo in stdlib_sources() for f in repo.files]
    texts, size = [], 0
    with open(path, "w") as out:
        while size < mbytes * 1e6:
            for f in files:
                text = f"# {f.relative_to(stdlib_root())} (copy {len(texts) // len(files)})\n" + f.read_text(
                    errors="replace")
                out.write(json.dumps({"text": text}) + "\n")
                texts.append(text)
                size += len(text.encode())
                if size >= mbytes * 1e6:
                    break
    return texts


def tree_memory_peak(proc: subprocess.Popen) -> tuple[int, int]:
    """Peak summed (PSS, RSS) in bytes of ``proc`` and its children until it exits.

    PSS splits pages shared between the forked workers and the main process, so it is the
    honest total; RSS counts shared pages (the imported libraries) once per process.
    """
    root, peak_pss, peak_rss = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            mem = [p.memory_full_info() for p in (root, *root.children(recursive=True))]
            peak_pss = max(peak_pss, sum(m.pss for m in mem))
            peak_rss = max(peak_rss, sum(m.rss for m in mem))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak_pss, peak_rss


def run_preprocess(corpus: Path, out: Path, model: Path, workers: int) -> dict:
    exe = Path(sys.executable).with_name("megaring-preprocess")
    cmd = [str(exe), f"input={corpus}", f"output={out}", f"workers={workers}", f"tokenizer.model={model}",
           "progress=false"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pss, rss = tree_memory_peak(proc)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"preprocess failed: {stderr}")
    summary = json.loads((out / "metadata.json").read_text())
    return {"workers": workers, "tokens": summary["tokens"], "encode_s": summary["seconds"],
            "wall_s": round(time.perf_counter() - start, 2), "peak_pss_mb": round(pss / 2**20),
            "peak_rss_sum_mb": round(rss / 2**20),
            "tokens_per_s_per_worker": round(summary["tokens"] / summary["seconds"] / max(workers, 1))}


def plain_encode_rate(sp, texts: list[str], **kw) -> tuple[int, float]:
    """(tokens, tokens/s) of plain ``sentencepiece`` encoding ``texts`` in one thread."""
    start, n = time.perf_counter(), 0
    for i in range(0, len(texts), 256):  # batches, so that the ids never all sit in memory
        n += sum(len(ids) for ids in sp.encode(texts[i:i + 256], num_threads=1, **kw))
    return n, n / (time.perf_counter() - start)


def bench_preprocess(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        texts = write_corpus(tmp / "corpus.jsonl", args.mbytes)
        model = tmp / "tok"  # a tokenizer trained once on the corpus by a first run
        subprocess.run([str(Path(sys.executable).with_name("megaring-preprocess")), f"input={tmp / 'corpus.jsonl'}",
                        f"output={model}", f"tokenizer.vocab_size={args.vocab_size}", "max_bytes=20000000",
                        "progress=false"], check=True, capture_output=True)
        sp = SentencePieceTokenizer(model / "tokenizer.model").sp
        pieces = [] if args.skip_plain else [p for t in texts for p in line_pieces(t)]
        plain, plain_np, plain_pieces, runs = [], [], [], {w: [] for w in args.workers}
        n = None
        for i in range(args.repeat):  # interleaved, so that load from other jobs hits every setting
            if not args.skip_plain:
                n, rate = plain_encode_rate(sp, texts)
                plain.append(rate)
                plain_np.append(plain_encode_rate(sp, texts, return_type="numpy")[1])
                plain_pieces.append(plain_encode_rate(sp, pieces)[1])
            for w in args.workers:
                out = tmp / f"out{w}-{i}"
                runs[w].append(run_preprocess(tmp / "corpus.jsonl", out, model / "tokenizer.model", w))
                assert n is None or runs[w][-1]["tokens"] == n + len(texts), "token count differs from plain"
                shutil.rmtree(out)
        if args.skip_plain:
            plain = plain_np = plain_pieces = [float("nan")]
            n = next(iter(runs.values()))[0]["tokens"] - len(texts)
        print(f"corpus: {len(texts):,} documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB, "
              f"{n:,} tokens (vocab {args.vocab_size}); {args.repeat} interleaved repeats, best and median")
        print(f"plain sentencepiece, 1 thread, same process: best {max(plain):,.0f} / median "
              f"{statistics.median(plain):,.0f} tokens/s on whole documents (lists of ints); best "
              f"{max(plain_np):,.0f} with numpy output; best {max(plain_pieces):,.0f} on the same "
              f"{PIECE_CHARS // 1024}K-character pieces")
        for w, rs in runs.items():
            rates = [r["tokens_per_s_per_worker"] for r in rs]
            print(json.dumps({"workers": w, "tokens": rs[0]["tokens"],
                              "best_tokens_per_s_per_worker": max(rates),
                              "median_tokens_per_s_per_worker": round(statistics.median(rates)),
                              "best_vs_best_plain": round(max(rates) / max(plain), 2),
                              "median_vs_median_plain": round(statistics.median(rates) / statistics.median(plain), 2),
                              "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                              "peak_pss_mb": max(r["peak_pss_mb"] for r in rs),
                              "peak_rss_sum_mb": max(r["peak_rss_sum_mb"] for r in rs)}))


def bench_shard(args) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4 * args.seq_len, 64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), 3 * args.seq_len)) + 1]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        ds = write_tokenized(Path(tmp) / "ds", (np.append(rng.integers(0, 31999, n - 1), 31999) for n in lengths),
                             vocab_size=32000, eod_id=31999)
        cfg = DataConfig(kind="files", path=str(ds.path))
        shape = BatchShape(args.seq_len, 1, 1)
        for cp, rank in ((1, 0), *((args.cp, r) for r in range(args.cp))):
            reader = build_batch_reader(cfg, shape, RankShard(cp_rank=rank, cp_size=cp), seed=0)
            store, times = reader.source.store, []
            for _ in range(args.repeat):
                before, start = store.bytes_read, time.perf_counter()
                out = reader.read_sample(0)
                times.append(time.perf_counter() - start)
            nbytes = store.bytes_read - before
            print(json.dumps({"cp": cp, "cp_rank": rank, "seq_len": args.seq_len, "local_tokens": out["tokens"].size,
                              "token_bytes_read": nbytes, "median_ms": round(1e3 * statistics.median(times), 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("preprocess")
    p.add_argument("--mbytes", type=float, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-plain", action="store_true", help="only run megaring-preprocess (large corpora)")
    s = sub.add_parser("shard")
    s.add_argument("--seq-len", type=int, default=1 << 20)
    s.add_argument("--cp", type=int, default=8)
    s.add_argument("--repeat", type=int, default=9)
    for q in (p, s):
        q.add_argument("--tmp", default=None, help="directory for temporary files")
    args = parser.parse_args()
    bench_preprocess(args) if args.what == "preprocess" else bench_shard(args)


if __name__ == "__main__":
    main()
