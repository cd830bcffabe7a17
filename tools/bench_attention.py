"""Benchmark ring / Ulysses / hybrid context attention against single-process SDPA (CPU, gloo).

Spawns ``cp`` processes (``threads`` torch threads each) that run ring attention forward and
backward on their shard, and one process with ``cp * threads`` threads that runs
``scaled_dot_product_attention`` on the whole sequence. Reports per rank the median
forward+backward time, the busy time inside block kernels, the balance ratio max/mean of
busy time, and the peak working memory of one forward+backward (VmHWM after a reset,
minus resident memory at the start; inputs are allocated beforehand and not counted).

    python -m tools.bench_attention --seq-len 8192 --heads 8 --head-dim 64 --cp 2 --layout zigzag
    python -m tools.bench_attention --seq-len 16384 --cp 2 --doc-len 2048   # packed documents
    python -m tools.bench_attention --seq-len 16384 --cp 4 --ulysses 1,2,4   # ring, 2x2 hybrid, Ulysses

``--ulysses`` runs ``megaring.context_attention`` at each factorisation ``cp = ulysses x ring`` in
one run, reports the bytes each rank sent (counted by the communication layer) and ranks the
factorisations by ``tools.plan_cp``'s prediction, calibrated on this machine: the kernel
throughput from the pure ring's busy time, the link speed from a timed ring exchange.

With ``--doc-len`` the sequence packs documents (``segment_ids``); SDPA then gets the boolean
``(S, S)`` document mask, which is what plain SDPA needs for them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from megaring.kernels import KERNELS, BlockKernel
from megaring.ring.backward import BACKWARDS
from megaring.ring.settings import RingSettings
from tools.rounds import median_ratio, time_calls

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TimedKernel(BlockKernel):
    """Delegates to another kernel and accumulates the seconds spent in it."""

    def __init__(self, inner: BlockKernel):
        self.inner, self.name, self.seconds = inner, "timed", 0.0

    def supports(self, q, mask):
        return self.inner.supports(q, mask)

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result

    def forward(self, *args, **kwargs):
        return self._timed(self.inner.forward, *args, **kwargs)

    def backward(self, *args, **kwargs):
        return self._timed(self.inner.backward, *args, **kwargs)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _measure_peak(step) -> float:
    """Peak working memory (MiB) of one call to ``step``: VmHWM after a reset minus VmRSS before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kb("VmRSS")
    step()
    return (_rss_kb("VmHWM") - base) / 1024


def _inputs(args, seq: int, generator_seed: int = 0):
    g = torch.Generator().manual_seed(generator_seed)
    dtype = DTYPES[args.dtype]
    q = torch.randn(1, seq, args.heads, args.head_dim, generator=g).to(dtype)
    k = torch.randn(1, seq, args.kv_heads or args.heads, args.head_dim, generator=g).to(dtype)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    return q, k, v, dout


def _segments(args, seq: int):
    """(1, S) document ids of packed documents, a boundary after each token with probability
    1/doc_len (mean length doc_len), or None without --doc-len."""
    if not args.doc_len:
        return None
    g = torch.Generator().manual_seed(1)
    return (torch.rand(1, seq, generator=g) < 1 / args.doc_len).long().cumsum(1)


def _ring_worker(rank, world, port, args, results):
    import datetime

    import torch.distributed as dist

    from megaring import context_attention, shard_sequence
    from megaring.distributed import ParallelDims, build_mesh
    from megaring.ring.attention import heads_major

    torch.set_num_threads(args.threads)
    settings = RingSettings(**({"grad_chunks": args.grad_chunks} if args.grad_chunks else {}),
                            q_tile_pieces=args.q_tile_pieces or None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    mesh = build_mesh(ParallelDims(cp=world, ulysses=args.ulysses), timeout_s=300)
    link_gbps = _link_gbps(mesh.cp)
    timed = TimedKernel(KERNELS[args.kernel])
    full = _inputs(args, args.seq_len)
    # (B, S, H, D) views of heads-major memory, as SDPA below gets (B, H, S, D) contiguous tensors:
    # the layout ring_attention would otherwise copy its inputs into.
    q, k, v, dout = (heads_major(shard_sequence(t, dim=1, rank=rank, world_size=world, layout=args.layout))
                     for t in full)
    seg = _segments(args, args.seq_len)
    seg = None if seg is None else shard_sequence(seg, dim=1, rank=rank, world_size=world, layout=args.layout)
    del full

    def step():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = context_attention(qq, kk, vv, ulysses_group=mesh.cp_ulysses, ring_group=mesh.cp_ring,
                                causal=not args.non_causal, layout=args.layout, kernel=timed, segment_ids=seg,
                                backward=args.backward, settings=settings)
        out.backward(dout)
        dist.barrier()

    step()  # warm up allocator, kernels and connections before measuring memory
    for axis in (mesh.cp_ulysses, mesh.cp_ring):
        axis.traffic.reset()
    peak = _measure_peak(step)
    sent = {"a2a_bytes": mesh.cp_ulysses.traffic.total(), "ring_bytes": mesh.cp_ring.traffic.total()}
    timed.seconds = 0.0
    times = time_calls(step, warmup=args.warmup, iters=args.iters)
    results.put((rank, {"median_s": statistics.median(times), "busy_s": timed.seconds / (args.warmup + args.iters),
                        "peak_mib": peak, "link_gbps": link_gbps, **sent}))
    dist.destroy_process_group()


def _link_gbps(axis, mib: int = 16, reps: int = 3) -> float:
    """GB/s of one ring exchange of ``mib`` MiB (send to the next rank while receiving), median of ``reps``."""
    import torch.distributed as dist

    from megaring.ring.comm import RingComm

    if axis.size == 1:
        return float("nan")
    x = torch.ones(mib * 2**18)  # float32
    times = []
    for _ in range(reps + 1):
        dist.barrier(group=axis.group)
        start = time.perf_counter()
        comm = RingComm(axis, tag=99)
        comm.send_recv([x])
        comm.wait()
        times.append(time.perf_counter() - start)
    axis.traffic.reset()
    return x.numel() * 4 / statistics.median(times[1:]) / 1e9


def _sdpa_worker(args, results):
    import torch.nn.functional as F

    torch.set_num_threads(args.threads * args.cp)
    q, k, v, dout = (t.transpose(1, 2).contiguous() for t in _inputs(args, args.seq_len))  # (B, H, S, D)
    seg = _segments(args, args.seq_len)

    def step():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        mask = None  # documents: plain SDPA needs the (S, S) mask
        if seg is not None:
            mask = seg[:, None, :, None] == seg[:, None, None, :]  # (1, 1, S, S)
            if not args.non_causal:
                mask = mask & torch.ones(args.seq_len, args.seq_len, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=seg is None and not args.non_causal,
                                             enable_gqa=kk.shape[1] != qq.shape[1])
        out.backward(dout)

    step()
    peak = _measure_peak(step)
    times = time_calls(step, warmup=args.warmup, iters=args.iters)
    results.put(("sdpa", {"median_s": statistics.median(times), "peak_mib": peak}))


def _spawn(target, argsets: list[tuple]) -> dict:
    """Run ``target(*argset, results)`` in one spawned process per argset; collect their reports."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, results)) for a in argsets]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"benchmark worker exited with {p.exitcode}")
    return out


def run_ring(args, layout: str, ulysses: int = 1) -> dict:
    from tests.helpers.pool import free_port

    args = argparse.Namespace(**{**vars(args), "layout": layout, "ulysses": ulysses})
    port = free_port()
    per_rank = _spawn(_ring_worker, [(r, args.cp, port, args) for r in range(args.cp)])
    ranks = [per_rank[r] for r in range(args.cp)]
    busy = [r["busy_s"] for r in ranks]
    return {
        "layout": layout, "ulysses": ulysses, "ring": args.cp // ulysses, "per_rank": ranks,
        "a2a_bytes_max": max(r["a2a_bytes"] for r in ranks), "ring_bytes_max": max(r["ring_bytes"] for r in ranks),
        "link_gbps": statistics.median(r["link_gbps"] for r in ranks),
        "wall_s": max(r["median_s"] for r in ranks),
        "balance_max_over_mean": max(busy) / statistics.mean(busy),
        "peak_mib_max": max(r["peak_mib"] for r in ranks),
    }


def run_sdpa(args) -> dict:
    return _spawn(_sdpa_worker, [(args,)])["sdpa"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per cp rank")
    p.add_argument("--layout", default="zigzag", help="zigzag, contiguous or both")
    p.add_argument("--ulysses", default="1", help="comma-separated Ulysses group sizes (cp = ulysses x ring)")
    p.add_argument("--kernel", default="cpu_flash", choices=sorted(KERNELS))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--doc-len", type=int, default=0, help="packed documents of this mean length (segment_ids)")
    p.add_argument("--backward", default="whole", choices=sorted(BACKWARDS), help="ring backward schedule")
    p.add_argument("--grad-chunks", type=int, default=0,
                   help="backward tiles and dK/dV chunks per local shard (default: RingSettings.grad_chunks)")
    p.add_argument("--q-tile-pieces", type=int, default=0,
                   help="backward query tiles span this many key pieces on CPU (default: the library's)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate SDPA and ring runs this many times")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def _label(run: dict) -> str:
    return f"{run['layout']} ulysses {run['ulysses']} x ring {run['ring']}"


def predicted_vs_measured(args, runs: list[dict]) -> list[dict]:
    """``tools.plan_cp`` calibrated on this run: kernel TFLOP/s from the first run's busy time, the
    link from the timed ring exchange; its bytes and ranking next to the measured ones."""
    from megaring.plan.cp import Workload, predict
    from megaring.plan.memory import Hardware

    w = Workload(args.seq_len, args.heads, args.kv_heads or args.heads, args.head_dim, 1, 1,
                 DTYPES[args.dtype].itemsize, not args.non_causal, bool(args.doc_len))
    flops = 3.5 * 2 * args.seq_len**2 * args.heads * args.head_dim / args.cp * (1 if w.causal else 2)
    tflops = flops / statistics.mean(r["busy_s"] for r in runs[0]["per_rank"]) / 1e12
    links = [r["link_gbps"] for r in runs if r["ring"] > 1]
    cluster = Hardware(gpus_per_node=args.cp, intra_gbps=statistics.median(links) if links else 1.0,
                       tflops=tflops, latency_us=100.0)
    out = []
    for run in runs:
        pred = predict(w, cluster, args.cp, run["ulysses"])
        out.append({"label": _label(run), "predicted_s": pred.time_s, "measured_s": run["wall_s"],
                    "predicted_bytes": pred.bytes, "measured_bytes": run["a2a_bytes_max"] + run["ring_bytes_max"]})
    print(f"cost model (tools.plan_cp) calibrated here: kernels {tflops * 1e3:.1f} GFLOP/s per rank, "
          f"link {cluster.intra_gbps:.2f} GB/s, latency {cluster.latency_us:.0f} us")
    for row in out:
        print(f"  {row['label']}: predicted {row['predicted_s'] * 1e3:.0f} ms, "
              f"measured {row['measured_s'] * 1e3:.0f} ms; "
              f"bytes/rank predicted {row['predicted_bytes'] / 2**20:.2f} MiB, "
              f"measured {row['measured_bytes'] / 2**20:.2f} MiB")
    rank = lambda key: [r["label"] for r in sorted(out, key=lambda r: r[key])]  # noqa: E731
    print(f"  ranking predicted: {rank('predicted_s')}\n  ranking measured:  {rank('measured_s')}")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Fixed mmap threshold: every large tensor is mapped and unmapped on free, so VmHWM sees
    # real peaks instead of heap pages glibc keeps after the first iteration.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    layouts = ("zigzag", "contiguous") if args.layout == "both" else (args.layout,)
    factors = [int(u) for u in args.ulysses.split(",")]
    rounds = [{"sdpa": run_sdpa(args), "ring": [run_ring(args, layout, u) for layout in layouts for u in factors]}
              for _ in range(args.rounds)]  # SDPA and the cp runs alternate: ratios within one round
    report = {"config": vars(args), "rounds": rounds}
    print(f"seq {args.seq_len}, heads {args.heads}/{args.kv_heads or args.heads}, head_dim {args.head_dim}, "
          f"{args.dtype}, {'non-causal' if args.non_causal else 'causal'}, kernel {args.kernel}, "
          f"{args.backward} backward"
          + (f", packed documents of mean length {args.doc_len}" if args.doc_len else ""))
    for i, rnd in enumerate(rounds):
        sdpa = rnd["sdpa"]
        print(f"round {i + 1}: sdpa 1 process x {args.cp * args.threads} threads: fwd+bwd "
              f"{sdpa['median_s'] * 1e3:.1f} ms, peak {sdpa['peak_mib']:.1f} MiB")
        for ring in rnd["ring"]:
            print(f"  cp={args.cp} x {args.threads} thread(s), {_label(ring)}: fwd+bwd "
                  f"{ring['wall_s'] * 1e3:.1f} ms ({ring['wall_s'] / sdpa['median_s']:.2f}x sdpa), balance max/mean "
                  f"{ring['balance_max_over_mean']:.3f}, peak/rank {ring['peak_mib_max']:.1f} MiB "
                  f"({ring['peak_mib_max'] / sdpa['peak_mib']:.2f}x sdpa), sent/rank all-to-all "
                  f"{ring['a2a_bytes_max'] / 2**20:.1f} MiB + ring {ring['ring_bytes_max'] / 2**20:.1f} MiB")
            for rank, r in enumerate(ring["per_rank"]):
                print(f"    rank {rank}: fwd+bwd {r['median_s'] * 1e3:.1f} ms, busy {r['busy_s'] * 1e3:.1f} ms, "
                      f"peak {r['peak_mib']:.1f} MiB")
    summary = report["summary"] = {}
    for j, run in enumerate(rounds[0]["ring"]):
        time_ratio = median_ratio((r["ring"][j]["wall_s"], r["sdpa"]["median_s"]) for r in rounds)
        mem_ratio = median_ratio((r["ring"][j]["peak_mib_max"], r["sdpa"]["peak_mib"]) for r in rounds)
        balance = statistics.median(r["ring"][j]["balance_max_over_mean"] for r in rounds)
        summary[_label(run)] = {"time_vs_sdpa": time_ratio, "peak_vs_sdpa": mem_ratio, "balance": balance}
        print(f"median of {len(rounds)} round(s), {_label(run)}: time {time_ratio:.2f}x sdpa, "
              f"balance {balance:.3f}, peak/rank {mem_ratio:.2f}x sdpa")
    report["cost_model"] = predicted_vs_measured(args, rounds[-1]["ring"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
