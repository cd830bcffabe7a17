"""The layout-independent part of a checkpoint: fp32 weights and Adam moments by (1, 1) name,
written by every rank in parallel, each its own pieces.

A checkpoint carries, next to the engine's own per-rank files (fast, same-layout resume)::

    universal/
      meta.json                     format, optimizer step, model config, training dtype, tokenizer
                                    file names, the world size that wrote it, and per parameter its
                                    full (1, 1) shape, its tp shard shape and how tp cut it
                                    (tp size, :class:`~megaring.tensor_parallel.utils.Partition`)
      rank_00003.json               rank 3's index: per piece, the tensor ("param" | "exp_avg" |
                                    "exp_avg_sq", name), the tp shard, the flat elements
                                    ``[start, stop)`` of that shard it holds, its file and entry
      rank_00003-00001.safetensors  rank 3's pieces (float32, 1-D); files of at most ``max_file_bytes``
      tokenizer/                    the tokenizer files of the run's data store or init_from checkpoint

Each rank writes, without communication, the pieces it owns: under ZeRO its partition of its tp
shard (ZeRO 1-2 cut the flattened shard at arbitrary element offsets, ZeRO-3 in equal parts),
without ZeRO the first rank of ``dp_cp`` the whole shard; a parameter that tp does not split is
written by tp rank 0 only. So the pieces of one (tensor, tp shard) cover its elements exactly
once, each rank writes about ``1 / world`` of the state, and no rank holds more than its own
partition plus one file's buffer. Rank 0 writes ``meta.json``; the checkpoint becomes visible only
after every rank's files are complete (:mod:`megaring.checkpoint.steps`).

Reading (:class:`UniversalState`) asks for rows of a full tensor, or this rank's shard at another
tp size, and reads only the pieces that overlap them (safetensors ``get_slice``): any layout
resumes from it (:func:`load_weights`, then :func:`load_optimizer`) and ``megaring-export`` reads
the weights in one process without torch.distributed. Why not ``torch.distributed.checkpoint``:
see docs/architecture.md. Safetensors and JSON only: loading runs no pickle. Format 1 (one file
set written by rank 0, full tensors) is still read.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megaring.engine.deepspeed_internals import unpartitioned_shape
from megaring.model import ModelConfig
from megaring.model.init import ShardWriter, tp_partitions
from megaring.tensor_parallel.utils import Partition

UNIVERSAL = "universal"
META = "meta.json"
FORMAT = 2
READS = (1, 2)  # format 1: full tensors written by rank 0 (before per-rank pieces)
KEYS = ("param", "exp_avg", "exp_avg_sq")
CHUNK_BYTES = 64 << 20  # rows read at a time when a loader re-cuts a tensor that tp splits along dim 1


class UniversalError(ValueError):
    """A layout-independent checkpoint that is missing or unreadable; the message names the file."""


def index_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


class _ShardedWriter:
    """Tensors into ``<prefix>-0000k.safetensors`` files of at most ``max_bytes`` each."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int):
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.files = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.pending and sum(t.nbytes for t in self.pending.values()) + tensor.nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.detach().cpu().contiguous()  # a view of this rank's own state on CPU

    def flush(self) -> None:
        if not self.pending:
            return
        self.files += 1
        name = f"{self.prefix}-{self.files:05d}.safetensors"
        save_file(self.pending, str(self.directory / name))
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending = {}


def save_universal(engine, directory: Path, *, model_cfg: ModelConfig, dtype: torch.dtype,
                   tokenizer_files: list[str], max_file_bytes: int = 1 << 30) -> None:
    """Write this rank's pieces of ``directory/universal`` (every rank calls it; no communication)."""
    out = directory / UNIVERSAL
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    writer = _ShardedWriter(out, f"rank_{rank:05d}", max_file_bytes)
    partitions = tp_partitions(engine.module)
    engine.link_optimizer_views()
    pieces = []
    for name, param in engine.module.named_parameters():
        if name not in partitions and engine.tp.rank != 0:
            continue  # replicated over tp: tp rank 0's copy is the one saved
        for key in KEYS:
            found = engine.master_fragment(param, key)
            if found is None or found[1].numel() == 0:
                continue
            start, flat = found
            writer.add(f"{key}.{name}", flat)
            pieces.append({"key": key, "name": name, "tp_rank": engine.tp.rank, "start": start,
                           "stop": start + flat.numel(), "entry": f"{key}.{name}"})
    writer.flush()
    for piece in pieces:
        piece["file"] = writer.weight_map[piece["entry"]]
    (out / index_name(rank)).write_text(json.dumps({"rank": rank, "pieces": pieces}))
    if rank == 0:
        names = _copy_tokenizer(tokenizer_files, out / "tokenizer")
        meta = {"format": FORMAT, "optimizer_step": engine.optimizer_step(), "model": asdict(model_cfg),
                "dtype": str(dtype).removeprefix("torch."), "tokenizer_files": names,
                "world_size": dist.get_world_size(), "tensors": tensor_layouts(engine.module, partitions, engine.tp)}
        (out / META).write_text(json.dumps(meta, indent=1))


def tensor_layouts(model: torch.nn.Module, partitions: dict[str, Partition], tp) -> dict[str, dict]:
    """Per parameter: full (1, 1) shape, tp shard shape, tp size and partition (None: replicated)."""
    out = {}
    for name, param in model.named_parameters():
        shard_shape = tuple(unpartitioned_shape(param))
        part = partitions.get(name)
        full = shard_shape if part is None else part.full_shape(shard_shape, tp.size)
        out[name] = {"shape": list(full), "shard_shape": list(shard_shape), "tp_size": tp.size,
                     "partition": None if part is None else asdict(part)}
    return out


def _copy_tokenizer(files: list[str], dest: Path) -> list[str]:
    if not files:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / Path(f).name)
    return [Path(f).name for f in files]


def dim0_sources(part: Partition, tp_size: int, start: int, stop: int):
    """For full rows ``[start, stop)`` of a tensor that ``part`` splits along dim 0: the runs
    ``(tp_rank, local_start, local_stop)`` of shard rows that hold them, in full-row order.

    Block ``j`` (padded size ``b_j``, offset ``o_j``) gives rank ``r`` its rows
    ``[o_j + r b_j / tp, o_j + (r + 1) b_j / tp)``, at local offset ``sum_{k<j} b_k / tp``.
    """
    offset = local_offset = 0
    for block in part.blocks:
        n = block // tp_size
        for r in range(tp_size):
            lo, hi = max(start, offset + r * n), min(stop, offset + (r + 1) * n, part.full_size)
            if lo < hi:
                yield r, local_offset + lo - offset - r * n, local_offset + hi - offset - r * n
        offset, local_offset = offset + block, local_offset + n


class UniversalState:
    """A checkpoint's ``universal/`` directory, opened for reading (pieces read as they are asked for)."""

    def __init__(self, checkpoint: Path):
        self.directory = Path(checkpoint) / UNIVERSAL
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise UniversalError(f"{meta_path} is missing: the checkpoint {checkpoint} has no layout-independent "
                                 "state (trainer.universal_every left it out, it was written before that state "
                                 "existed, or its save did not complete)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as err:
            raise UniversalError(f"{meta_path} is corrupted ({err!r})") from None
        self.format = self.meta.get("format")
        if self.format not in READS:
            raise UniversalError(f"{meta_path} has format {self.format}, this megaring reads {READS}")
        try:
            if self.format == 1:
                self.weight_map: dict[str, str] = self.meta["weight_map"]
            else:
                self.layouts: dict[str, dict] = self.meta["tensors"]
                self.pieces = self._read_indexes(int(self.meta["world_size"]))
        except (ValueError, KeyError, TypeError) as err:
            raise UniversalError(f"{meta_path} is corrupted ({err!r})") from None

    def _read_indexes(self, world_size: int) -> dict[tuple[str, str, int], list[tuple[int, int, str, str]]]:
        """``(key, name, tp_rank) -> [(start, stop, file, entry)]`` from every rank's index, by start."""
        pieces = defaultdict(list)
        for rank in range(world_size):
            path = self.directory / index_name(rank)
            try:
                index = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise UniversalError(f"cannot read {path} (rank {rank}'s index of its pieces): {err}") from None
            for p in index["pieces"]:
                pieces[p["key"], p["name"], p["tp_rank"]].append((p["start"], p["stop"], p["file"], p["entry"]))
        return {k: sorted(v) for k, v in pieces.items()}

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.meta["model"])

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.directory / "tokenizer" / n for n in self.meta.get("tokenizer_files", [])]

    def names(self, key: str = "param") -> list[str]:
        """The (1, 1) parameter names that carry ``key``, in saved order."""
        if self.format == 1:
            return [k.split(".", 1)[1] for k in self.weight_map if k.split(".", 1)[0] == key]
        return list(self.layouts)

    def shape(self, key: str, name: str) -> tuple[int, ...]:
        """The full tensor's shape (from the metadata, or format 1's file header)."""
        if self.format == 1:
            return tuple(self._legacy_slice(key, name, lambda s: s.get_shape()))
        return tuple(self._layout(name)["shape"])

    def tensor(self, key: str, name: str) -> torch.Tensor:
        """The whole (1, 1) tensor (a copy)."""
        return self.rows(key, name, 0, self.shape(key, name)[0])

    def rows(self, key: str, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the full tensor, read from the pieces that hold them only."""
        if self.format == 1:
            return self._legacy_slice(key, name, lambda s: s[start:stop])
        layout = self._layout(name)
        part, tp_size = self._partition(name), layout["tp_size"]
        if part is None:
            return self._shard_rows(key, name, 0, start, stop)
        if part.dim != 0:
            return part.unshard([self._shard_rows(key, name, r, start, stop) for r in range(tp_size)])
        runs = [self._shard_rows(key, name, r, lo, hi) for r, lo, hi in dim0_sources(part, tp_size, start, stop)]
        return torch.cat(runs) if runs else torch.empty(0, *layout["shape"][1:])

    def shard(self, key: str, name: str, part: Partition | None, tp) -> torch.Tensor:
        """Tp rank ``tp.rank``'s shard of the full tensor cut by ``part`` over ``tp.size`` (the
        reading layout's), assembled from full rows without holding the full tensor when tp splits it."""
        shape = self._shard_shape(key, name, part, tp.size)
        return self.shard_rows(key, name, part, tp, 0, shape[0])

    def shard_elements(self, key: str, name: str, part: Partition | None, tp, start: int, stop: int) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of :meth:`shard` (one rank's ZeRO partition of it), read
        through the shard rows that hold them only."""
        shape = self._shard_shape(key, name, part, tp.size)
        row = math.prod(shape[1:])
        first, last = start // row, -(-stop // row)
        rows = self.shard_rows(key, name, part, tp, first, last)
        return rows.reshape(-1)[start - first * row:stop - first * row]

    def shard_rows(self, key: str, name: str, part: Partition | None, tp, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of :meth:`shard`: full rows (no split), full rows cut by columns
        (split along dim 1, a chunk of rows at a time), or the full rows of each block's part (dim 0;
        rows past the real vocabulary are the padding's zeros)."""
        full = self.shape(key, name)
        if part is None:
            return self.rows(key, name, start, stop)
        if part.dim != 0:
            step = max(1, CHUNK_BYTES // max(1, 4 * math.prod(full[1:])))
            return torch.cat([part.shard(self.rows(key, name, a, min(a + step, stop)), tp.rank, tp.size)
                              for a in range(start, stop, step)] or [torch.empty(0, *full[1:])])
        runs, local, offset = [], 0, 0
        for block in part.blocks:  # rank r's part of every (padded) block, in block order
            n = block // tp.size
            lo, hi = max(start, local), min(stop, local + n)
            if lo < hi:
                first = offset + tp.rank * n + lo - local
                real = self.rows(key, name, min(first, full[0]), min(first + hi - lo, full[0]))
                runs += [real, real.new_zeros(hi - lo - real.shape[0], *full[1:])]
            local, offset = local + n, offset + block
        return torch.cat(runs) if runs else torch.empty(0, *full[1:])

    def _shard_shape(self, key: str, name: str, part: Partition | None, tp_size: int) -> list[int]:
        shape = list(self.shape(key, name))
        if part is not None:
            shape[part.dim] = sum(part.local_blocks(tp_size))
        return shape

    def _layout(self, name: str) -> dict:
        if name not in self.layouts:
            raise UniversalError(f"{self.directory / META} lists no tensor {name!r}")
        return self.layouts[name]

    def _partition(self, name: str) -> Partition | None:
        p = self._layout(name)["partition"]
        return None if p is None else Partition(p["dim"], tuple(p["blocks"]), p["unpadded"])

    def _shard_rows(self, key: str, name: str, tp_rank: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the saved tp shard ``tp_rank``."""
        shard_shape = self._layout(name)["shard_shape"]
        row = math.prod(shard_shape[1:])
        return self._shard_flat(key, name, tp_rank, start * row, stop * row).view(stop - start, *shard_shape[1:])

    def _shard_flat(self, key: str, name: str, tp_rank: int, start: int, stop: int) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of the saved tp shard ``tp_rank``, from the pieces overlapping them."""
        out = torch.empty(stop - start, dtype=torch.float32)
        covered = 0
        for p_start, p_stop, file, entry in self.pieces.get((key, name, tp_rank), ()):
            lo, hi = max(start, p_start), min(stop, p_stop)
            if lo >= hi:
                continue
            out[lo - start:hi - start] = self._read(file, entry, lo - p_start, hi - p_start)
            covered += hi - lo
        if covered != stop - start:
            raise UniversalError(f"{self.directory}: the pieces of {key}.{name} (tp shard {tp_rank}) cover "
                                 f"{covered} of its elements [{start}, {stop}): some rank's files are missing")
        return out

    def _read(self, file: str, entry: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of one piece, through a mapping opened for them alone (pages read
        stay in the process's resident memory while a mapping holds them)."""
        path = self.directory / file
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_slice(entry)[start:stop]
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for bad files
            raise UniversalError(f"cannot read {entry!r} from {path}: {err}") from None

    def _legacy_slice(self, key: str, name: str, take):
        full_key = f"{key}.{name}"
        if full_key not in self.weight_map:
            raise UniversalError(f"{self.directory / META} lists no tensor {full_key!r}")
        path = self.directory / self.weight_map[full_key]
        try:
            with safe_open(str(path), framework="pt") as f:
                return take(f.get_slice(full_key))
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for bad files
            raise UniversalError(f"cannot read {path}: {err}") from None


class UniversalWeights:
    """The fp32 weights of a :class:`UniversalState` as a ``megaring.hf.export.TensorSource``,
    read by rows."""

    def __init__(self, state: UniversalState):
        self.state = state

    def names(self) -> list[str]:
        return self.state.names("param")

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.state.shape("param", name), torch.float32

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state.rows("param", name, start, stop)


@torch.no_grad()
def load_weights(model: torch.nn.Module, state: UniversalState, tp, writer: ShardWriter | None = None) -> None:
    """Copy this rank's shards of the saved fp32 weights into ``model`` (before the engine exists),
    one parameter at a time, through ``writer`` (default: the whole shard into the parameter; ZeRO-3:
    only this rank's partition of it is read)."""
    writer = writer or ShardWriter()
    partitions = tp_partitions(model)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state.names()))
    if missing:
        raise UniversalError(f"{state.directory} has no weights for {missing[:5]}: it was written for another model")
    for name, param in params.items():
        start, stop = writer.owned_range(param)
        writer.write(param, state.shard_elements("param", name, partitions.get(name), tp, start, stop).to(param.device))


def load_optimizer(engine, state: UniversalState) -> None:
    """Set the engine's fp32 master weights and Adam moments from ``state`` (after :func:`load_weights`),
    reading of each tensor only the elements this rank keeps (its ZeRO partition)."""
    engine.prime_optimizer_states(int(state.meta["optimizer_step"]))
    partitions = tp_partitions(engine.module)
    for name, param in engine.module.named_parameters():
        owned = engine.master_range(param)
        if owned is None:
            continue  # ZeRO 1-2: this rank's partition holds no piece of it
        for key in KEYS:
            engine.set_master_fragment(param, key, state.shard_elements(key, name, partitions.get(name), engine.tp,
                                                                        *owned))
