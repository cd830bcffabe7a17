"""Factor cp into Ulysses x ring: the cost model of :mod:`megaring.plan.cp` on the command line.

Prints, for one attention layer (forward + backward) per rank, every factorisation of cp with its
bytes sent and predicted time, best first (the formulas are in ``megaring/plan/cp.py``).

    python -m tools.plan_cp --model llama3_8b --seq-len 1048576 --cp 64 --gpus-per-node 8 \\
        --intra-gbps 450 --inter-gbps 50 --kernel-tflops 400 --dtype-bytes 2
"""

from __future__ import annotations

import argparse

from megaring.plan.cp import Prediction, Workload, describe, plan
from megaring.plan.memory import Hardware


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a megaring/configs/model name (its heads and head_dim)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--documents", action="store_true", help="segment ids travel too")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=450.0, help="GB/s per GPU per direction inside a node")
    p.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s per GPU per direction across nodes")
    p.add_argument("--kernel-tflops", type=float, default=400.0, help="attention kernel throughput, fwd+bwd")
    p.add_argument("--latency-us", type=float, default=10.0)
    p.add_argument("--layers", type=int, default=None, help="also print per-step attention time for this many layers")
    return p.parse_args(argv)


def main(argv=None) -> list[Prediction]:
    args = parse_args(argv)
    if args.model:
        from omegaconf import OmegaConf

        from megaring.config_dir import CONFIG_DIR
        from megaring.model import ModelConfig

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                  OmegaConf.load(f"{CONFIG_DIR}/model/{args.model}.yaml")))
        args.heads, args.kv_heads, args.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        args.layers = args.layers or cfg.n_layers
    w = Workload(args.seq_len, args.heads, args.kv_heads or args.heads, args.head_dim, args.batch, args.tp,
                 args.dtype_bytes, not args.non_causal, args.documents)
    c = Hardware(tflops=args.kernel_tflops, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                 gpus_per_node=args.gpus_per_node, latency_us=args.latency_us)
    preds = plan(w, c, args.cp)
    print(f"seq {w.seq_len} x batch {w.batch}, heads {w.n_heads}/{w.n_kv_heads} x {w.head_dim}, tp {w.tp}, "
          f"cp {args.cp}, {w.dtype_bytes}-byte elements; {c.gpus_per_node} GPUs/node, {c.intra_gbps} GB/s in the "
          f"node, {c.inter_gbps} GB/s across, kernels {c.tflops} TFLOP/s, latency {c.latency_us} us")
    print("per rank, one attention layer, forward + backward:")
    print(describe(preds))
    best = preds[0]
    extra = f" ({best.time_s * args.layers:.2f} s for {args.layers} layers)" if args.layers else ""
    print(f"best: parallel.cp={args.cp} parallel.ulysses={best.ulysses} (ring {best.ring}): "
          f"{best.time_s * 1e3:.2f} ms per layer{extra}")
    return preds


if __name__ == "__main__":
    main()
