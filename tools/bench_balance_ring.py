"""Ring attention fwd+bwd wall time and K/V bytes per rank: zigzag vs balanced, and windows (CPU, gloo).

Spawns ``cp`` gloo processes (one torch thread each). Each case runs ring attention forward and
backward on the rank's shard of one packed sample (documents from a mix of
:mod:`megaring.data.doc_mixes`), in ``--iters`` rounds after a warm-up round, every case once per
round in turn (the machines are shared). Reported: medians over rounds of the slowest rank's wall
time and of the busiest rank's CPU time (what the work costs, whatever else runs), the median
per-round ratio balanced / zigzag, and the bytes each rank sent
(:class:`megaring.distributed.mesh.Traffic`, K/V and dK/dV, forward and backward).

    python -m tools.bench_balance_ring --seq-len 16384 --cp 4
    python -m tools.bench_balance_ring --seq-len 65536 --cp 4 --window 4096

With ``--window`` it compares, on one document, the full ring (zigzag, no window), the windowed
ring (zigzag and contiguous), and one process (``--cp`` torch threads) running the same window:
torch SDPA on query chunks of ``W`` rows against their ``2W - 1`` keys with an explicit banded
mask, and the mask-aware path itself (:func:`megaring.ring_attention` on one process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaring import ring_attention, shard_sequence
from megaring.data.doc_mixes import pack_samples, segment_ids, stream
from megaring.distributed.mesh import Axis, Traffic
from megaring.layout import document_positions
from tools.rounds import median_ratio


def _segments(mix: str, seq: int) -> torch.Tensor:
    """The second sample of ``seq`` tokens of the mix (the first of ``stdlib`` is one document)."""
    return segment_ids(pack_samples(stream(mix, seq * 2, seed=1), seq, 2)[-1] if mix != "one" else [seq])


def _worker(rank, world, port, args, cases, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    s, h, hk, d = args.seq_len, args.heads, args.kv_heads, args.head_dim
    q, k, v = (torch.randn(1, s, n, d, generator=g) for n in (h, hk, hk))
    inputs = {}
    for name, mix, layout, _, _ in cases:
        seg = _segments(mix, s)[None]
        shard = dict(dim=1, rank=rank, world_size=world, layout=layout, segment_ids=seg)
        inputs[name] = [shard_sequence(t, **shard) for t in (q, k, v, seg, document_positions(seg))]
    results = {name: ([], [], 0) for name, *_ in cases}
    for it in range(args.iters + 1):  # rounds: every case once per round, in turn (shared machines)
        for name, _, layout, window, use_pos in cases:
            ql, kl, vl, sl, pl = inputs[name]
            ql, kl, vl = (t.detach().requires_grad_() for t in (ql, kl, vl))
            traffic = Traffic()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            out = ring_attention(ql, kl, vl, group=dist.group.WORLD, segment_ids=sl,
                                 positions=pl if use_pos else None, window=window, layout=layout, traffic=traffic)
            out.sum().backward()
            spent = torch.tensor([time.perf_counter() - t0, time.process_time() - c0])
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
            if it:  # round 0 is a warm-up
                walls, cpus, _ = results[name]
                results[name] = (walls + [float(spent[0])], cpus + [float(spent[1])], traffic.total())
    queue.put((rank, results))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--skip-full", action="store_true", help="with --window: leave out the full ring")
    args = p.parse_args()
    if args.window:
        cases = [] if args.skip_full else [("zigzag, full ring (one document)", "one", "zigzag", None, False)]
        cases += [(f"zigzag, window {args.window}", "one", "zigzag", args.window, False),
                 (f"contiguous, window {args.window}", "one", "contiguous", args.window, False)]
    else:
        cases = [(f"{mix}, {layout}", mix, layout, None, layout == "balanced")
                 for mix in ("stdlib", "lognormal") for layout in ("zigzag", "balanced")]
    from tests.helpers.pool import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.cp, port, args, cases, out)) for r in range(args.cp)]
    for proc in procs:
        proc.start()
    per_rank = dict(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    print(f"seq {args.seq_len}, cp {args.cp}, heads {args.heads}/{args.kv_heads}x{args.head_dim}, float32")
    print("| case | fwd+bwd wall s (slowest rank) | CPU s (busiest rank) | MiB sent per rank (max / mean) |")
    print("|---|---|---|---|")
    for name, *_ in cases:
        walls, cpus, _ = per_rank[0][name]
        sent = [per_rank[r][name][2] / 2**20 for r in range(args.cp)]
        print(f"| {name} | {statistics.median(walls):.3f} | {statistics.median(cpus):.3f} | "
              f"{max(sent):.1f} / {statistics.mean(sent):.1f} |")
    if args.window:
        for name, (wall, cpu) in _single_process(args).items():
            print(f"| {name} | {wall:.3f} | {cpu:.3f} | 0 |")
    else:
        for mix in ("stdlib", "lognormal"):
            z, b = per_rank[0][f"{mix}, zigzag"], per_rank[0][f"{mix}, balanced"]
            print(f"{mix}: balanced / zigzag, median over rounds: wall {median_ratio(zip(b[0], z[0])):.2f}x, "
                  f"CPU {median_ratio(zip(b[1], z[1])):.2f}x")


def _single_process(args) -> dict[str, tuple[float, float]]:
    """fwd+bwd wall and CPU seconds (medians) of one process running the window on the whole
    sequence (CPU seconds count all its threads)."""
    torch.set_num_threads(args.cp)
    g = torch.Generator().manual_seed(0)
    s, w = args.seq_len, args.window
    q, k, v = (torch.randn(1, s, n, args.head_dim, generator=g).requires_grad_()
               for n in (args.heads, args.kv_heads, args.kv_heads))
    pos = torch.arange(s)[None]
    runs = {f"SDPA, window {w}, banded chunks (1 process)": lambda: _sdpa_window(q, k, v, w),
            f"mask-aware path, window {w} (1 process)": lambda: ring_attention(
                q, k, v, group=Axis.single("cp"), positions=pos, window=w)}
    out = {}
    for name, fn in runs.items():
        walls, cpus = [], []
        for it in range(args.iters + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            fn().sum().backward()
            if it:
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        out[name] = (statistics.median(walls), statistics.median(cpus))
    return out


def _sdpa_window(q, k, v, w: int) -> torch.Tensor:
    """Causal sliding-window attention with torch SDPA: query chunks of ``w`` rows, each against
    its ``2w - 1`` keys with an explicit band mask ``0 <= i - j < w``. (B, S, H, D) in and out."""
    s, rep = q.shape[1], q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # (B, H, S, D)
    kh, vh = (t.transpose(1, 2).repeat_interleave(rep, dim=1) for t in (k, v))
    outs = []
    for a in range(0, s, w):
        b, lo = min(s, a + w), max(0, a - w + 1)
        d = torch.arange(a, b)[:, None] - torch.arange(lo, b)[None, :]  # (rows, keys) query - key
        band = (d >= 0) & (d < w)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qh[:, :, a:b], kh[:, :, lo:b], vh[:, :, lo:b], attn_mask=band))
    return torch.cat(outs, dim=2).transpose(1, 2)


if __name__ == "__main__":
    main()
