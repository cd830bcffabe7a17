"""Cost of the cpu_flash kernel's NaN-row fill: its forward against the op's forward without it.

The fused CPU op returns out 0 / lse 0 for a query row holding NaN; ``nan_query_rows`` turns such
rows back into NaN. It looks at q only when some row's lse is exactly 0, so on finite input it costs
one comparison over lse ``(B, H, S)``. Side by side, interleaved:

    python -m tools.bench_nan_rows --seq-len 4096 --heads 8 --head-dim 64
"""

from __future__ import annotations

import argparse
import statistics

import torch

from megaring.kernels.base import fix_empty_rows
from megaring.kernels.cpu_flash import _FWD, CpuFlashKernel
from tools.rounds import median_ratio, time_calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    q, k, v = (torch.randn(1, args.seq_len, args.heads, args.head_dim) for _ in range(3))  # (B, S, H, D)
    kernel, scale = CpuFlashKernel(), args.head_dim ** -0.5

    def with_fill():
        return kernel.forward(q, k, v, scale=scale, causal=True, mask=None)

    def without_fill():  # the forward before the fill
        out, lse = _FWD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, scale=scale)
        return fix_empty_rows(out.transpose(1, 2), lse.float(), None)

    pairs = []
    for _ in range(args.rounds):
        a = statistics.median(time_calls(with_fill, warmup=1, iters=args.iters))
        b = statistics.median(time_calls(without_fill, warmup=1, iters=args.iters))
        pairs.append((a, b))
    print(f"cpu_flash causal forward, {args.seq_len} tokens x {args.heads} heads x {args.head_dim}: "
          f"with the NaN-row fill {statistics.median(a for a, _ in pairs) * 1e3:.1f} ms, without "
          f"{statistics.median(b for _, b in pairs) * 1e3:.1f} ms, ratio {median_ratio(pairs):.3f} (median of rounds)")


if __name__ == "__main__":
    main()
