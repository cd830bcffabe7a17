"""Benchmark saving the layout-independent checkpoint state at world 1, 2, 4 and 8, before and after.

    python -m tools.bench_checkpoint [--worlds 1 2 4 8] [--dim 384 --layers 6 --vocab 8192] [--rounds 3]

For each world size, gloo processes at dp=world, ZeRO-1 build the same model (float32, Adam state
primed), then save its ``universal/`` state twice, in the same processes:

- ``before``: the format-1 save this replaced (kept here as the baseline): every tensor gathered
  over ZeRO's partitions and tp to global rank 0, which writes it all alone;
- ``after``: :func:`megaring.checkpoint.universal.save_universal`, every rank writing its own pieces.

Per rank it reports the save's wall time (from a barrier to the barrier after it: what every rank
waits; the median of ``--rounds`` saves of each kind, alternating) and the bytes that rank wrote;
the summary is a markdown table for docs/benchmarks.md. Both
saves are then read back and compared tensor by tensor (they must be bit-identical).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def save_gathered(engine, directory: Path, *, model_cfg, dtype, tokenizer_files, max_file_bytes=1 << 30) -> None:
    """The format-1 save (before): each tensor gathered to global rank 0, which writes alone."""
    from dataclasses import asdict

    import torch.distributed as dist

    from megaring.checkpoint.universal import KEYS, META, UNIVERSAL, _ShardedWriter
    from megaring.model.init import tp_partitions
    from megaring.model.state_dict import gather_full_tensor

    out, writer = directory / UNIVERSAL, None
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        writer = _ShardedWriter(out, "state", max_file_bytes)
    partitions = tp_partitions(engine.module)
    engine.link_optimizer_views()
    for name, param in engine.module.named_parameters():
        for key in KEYS:
            master = engine.master_state(param, key)  # collective over dp x cp under ZeRO
            if 0 in engine.tp.ranks:
                full = gather_full_tensor(master, partitions.get(name), engine.tp, first_only=True)
                if writer is not None:
                    writer.add(f"{key}.{name}", full)
    if writer is not None:
        writer.flush()
        meta = {"format": 1, "optimizer_step": engine.optimizer_step(), "model": asdict(model_cfg),
                "dtype": str(dtype).removeprefix("torch."), "tokenizer_files": [], "weight_map": writer.weight_map}
        (out / META).write_text(json.dumps(meta))


def _written_by(directory: Path, rank: int, mode: str) -> int:
    """Bytes of the files ``rank`` wrote into ``directory/universal``."""
    files = list((directory / "universal").iterdir())
    if mode == "before":
        return sum(f.stat().st_size for f in files) if rank == 0 else 0
    own = [f for f in files if f.name.startswith(f"rank_{rank:05d}") or (rank == 0 and f.name == "meta.json")]
    return sum(f.stat().st_size for f in own)


def _save_worker(rank: int, world: int, port: int, work: str, model_args: list[str], rounds: int,
                 results) -> None:
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from megaring.checkpoint.universal import save_universal
    from megaring.distributed import build_mesh
    from megaring.engine.deepspeed_engine import build_engine
    from megaring.model import ParallelContext
    from megaring.train.trainer import build_weights
    from tests.helpers.train_cfg import compose_cfg

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    cfg = compose_cfg("model=tiny", *model_args, "data=mock", f"parallel.dp={world}", "parallel.zero_stage=1",
                      "trainer.dtype=float32", "trainer.seq_len=64", f"trainer.global_batch_size={world}",
                      "logging.wandb.mode=disabled")
    mesh = build_mesh(cfg.parallel.dims())
    engine = build_engine(build_weights(cfg, ParallelContext.from_mesh(mesh), mesh, torch.device("cpu")),
                          cfg, mesh, torch.device("cpu"))
    engine.prime_optimizer_states(1)
    walls = {"before": [], "after": []}
    for i in range(rounds):
        for mode, save in (("before", save_gathered), ("after", save_universal)):
            directory = Path(work) / f"world{world}-{mode}"
            dist.barrier()
            began = time.perf_counter()
            save(engine, directory, model_cfg=cfg.model, dtype=torch.float32, tokenizer_files=[])
            dist.barrier()
            walls[mode].append(time.perf_counter() - began)
            written = _written_by(directory, rank, mode)
            dist.barrier()
            if rank == 0 and i < rounds - 1:  # the last round's state stays for the read-back check
                shutil.rmtree(directory)
    out = {mode: {"wall_s": statistics.median(w), "bytes": written if mode == "after" else None} for mode, w in
           walls.items()}
    out["before"]["bytes"] = _written_by(Path(work) / f"world{world}-before", rank, "before")
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def _same_state(work: Path, world: int) -> bool:
    from megaring.checkpoint.universal import KEYS, UniversalState

    before, after = UniversalState(work / f"world{world}-before"), UniversalState(work / f"world{world}-after")
    return sorted(before.names()) == sorted(after.names()) and all(
        before.tensor(k, n).equal(after.tensor(k, n)) for k in KEYS for n in after.names())


def main() -> None:
    from tools.bench_pretrained import _run_megaring

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3, help="saves of each kind per world size (median)")
    parser.add_argument("--tmp", default=None, help="where the checkpoints are written (removed after)")
    args = parser.parse_args()
    model_args = [f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.ffn_dim={4 * args.dim}",
                  f"model.vocab_size={args.vocab}"]
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.tmp))
    rows = []
    try:
        for world in args.worlds:
            per_rank = _run_megaring(str(work), world, _save_worker, model_args, args.rounds)
            same = _same_state(work, world)
            print(f"world {world}: {json.dumps(per_rank)}; read back identical: {same}", flush=True)
            rows.append((world, per_rank, same))
            for mode in ("before", "after"):
                shutil.rmtree(work / f"world{world}-{mode}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(r["before"]["bytes"] for r in rows[0][1])
    print(f"\nmodel: {' '.join(model_args)}; fp32 weights + Adam moments: {total / 2**20:.1f} MiB; ZeRO-1, dp=world")
    print("| world | save before (s) | save after (s) | MiB written per rank before (rank 0 / others) "
          "| MiB written per rank after (max / min) | identical |\n|---|---|---|---|---|---|")
    for world, per_rank, same in rows:
        b, a = ([r[m] for r in per_rank] for m in ("before", "after"))
        others = max((x["bytes"] for x in b[1:]), default=0)
        print(f"| {world} | {max(x['wall_s'] for x in b):.2f} | {max(x['wall_s'] for x in a):.2f} "
              f"| {b[0]['bytes'] / 2**20:.1f} / {others / 2**20:.1f} "
              f"| {max(x['bytes'] for x in a) / 2**20:.1f} / {min(x['bytes'] for x in a) / 2**20:.1f} | {same} |")


if __name__ == "__main__":
    main()
