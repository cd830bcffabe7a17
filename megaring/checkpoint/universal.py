"""The layout-independent part of a checkpoint: full fp32 weights and Adam moments, by (1, 1) name.

Every checkpoint carries, next to the engine's own per-rank files (fast, same-layout resume)::

    universal/
      meta.json                    format, optimizer step, model config, training dtype, tokenizer
                                   file names, and which file holds each tensor
      state-00001.safetensors ...  "param.<name>", "exp_avg.<name>", "exp_avg_sq.<name>": float32,
                                   full (1, 1) shapes (tp shards joined, ZeRO partitions gathered,
                                   vocabulary unpadded); files of at most ``max_file_bytes``
      tokenizer/                   the tokenizer files of the run's data store or init_from checkpoint

Saving is collective (ZeRO gathers over dp x cp, tp gathers over tp); global rank 0 writes, holding
at most one file's worth of tensors plus one full parameter. Any layout resumes from it (each rank
slices its shards: :func:`load_weights`, then :func:`load_optimizer`), and ``megaring-export``
reads the weights in one process without torch.distributed. Safetensors and JSON only: loading
runs no pickle.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megaring.model import ModelConfig
from megaring.model.init import ShardWriter, tp_partitions
from megaring.model.state_dict import gather_full_tensor, shard_full_tensor

UNIVERSAL = "universal"
META = "meta.json"
FORMAT = 1
KEYS = ("param", "exp_avg", "exp_avg_sq")


class UniversalError(ValueError):
    """A layout-independent checkpoint that is missing or unreadable; the message names the file."""


class _ShardedWriter:
    """Tensors into ``state-0000k.safetensors`` files of at most ``max_bytes`` each (rank 0 only)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.pending and sum(t.nbytes for t in self.pending.values()) + tensor.nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"state-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / name))
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending = {}


def save_universal(engine, directory: Path, *, model_cfg: ModelConfig, dtype: torch.dtype,
                   tokenizer_files: list[str], max_file_bytes: int = 1 << 30) -> None:
    """Write ``directory/universal`` (collective: every rank calls it)."""
    out = directory / UNIVERSAL
    rank0 = dist.get_rank() == 0
    writer = None
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        writer = _ShardedWriter(out, max_file_bytes)
    partitions = tp_partitions(engine.module)
    engine.link_optimizer_views()
    writes = 0 in engine.tp.ranks  # rank 0's tp group joins the shards; the others only join ZeRO's gathers
    for name, param in engine.module.named_parameters():
        for key in KEYS:
            master = engine.master_state(param, key)  # collective over dp x cp under ZeRO
            if writes:
                full = gather_full_tensor(master, partitions.get(name), engine.tp, first_only=True)
                if writer is not None:
                    writer.add(f"{key}.{name}", full.cpu())
    step = engine.optimizer_step()
    if writer is None:
        return
    writer.flush()
    names = _copy_tokenizer(tokenizer_files, out / "tokenizer")
    meta = {"format": FORMAT, "optimizer_step": step, "model": asdict(model_cfg),
            "dtype": str(dtype).removeprefix("torch."), "tokenizer_files": names, "weight_map": writer.weight_map}
    (out / META).write_text(json.dumps(meta, indent=1))


def _copy_tokenizer(files: list[str], dest: Path) -> list[str]:
    if not files:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / Path(f).name)
    return [Path(f).name for f in files]


class UniversalState:
    """A checkpoint's ``universal/`` directory, opened for reading (memory-mapped, tensor by tensor)."""

    def __init__(self, checkpoint: Path):
        self.directory = Path(checkpoint) / UNIVERSAL
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise UniversalError(f"{meta_path} is missing: the checkpoint {checkpoint} has no layout-independent "
                                 "state (written before it existed, or its save did not complete)")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.weight_map: dict[str, str] = self.meta["weight_map"]
        except (ValueError, KeyError) as err:
            raise UniversalError(f"{meta_path} is corrupted ({err!r})") from None
        if self.meta.get("format") != FORMAT:
            raise UniversalError(f"{meta_path} has format {self.meta.get('format')}, this megaring reads {FORMAT}")
        self._files: dict[str, object] = {}

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.meta["model"])

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.directory / "tokenizer" / n for n in self.meta.get("tokenizer_files", [])]

    def names(self, key: str = "param") -> list[str]:
        """The (1, 1) parameter names that carry ``key``, in saved order."""
        return [k.split(".", 1)[1] for k in self.weight_map if k.split(".", 1)[0] == key]

    def tensor(self, key: str, name: str) -> torch.Tensor:
        full_key = f"{key}.{name}"
        return self._file(full_key).get_tensor(full_key)

    def rows(self, key: str, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the tensor (a copy), read through a mapping of its file opened for
        them alone: pages read stay in the process's resident memory while a mapping holds them."""
        full_key = f"{key}.{name}"
        self._file(full_key)  # errors name the file
        with safe_open(str(self.directory / self.weight_map[full_key]), framework="pt") as f:
            return f.get_slice(full_key)[start:stop]

    def shape(self, key: str, name: str) -> tuple[int, ...]:
        """The tensor's shape, read from its file's header only."""
        full_key = f"{key}.{name}"
        return tuple(self._file(full_key).get_slice(full_key).get_shape())

    def _file(self, full_key: str):
        if full_key not in self.weight_map:
            raise UniversalError(f"{self.directory / META} lists no tensor {full_key!r}")
        file = self.directory / self.weight_map[full_key]
        if file not in self._files:
            try:
                self._files[file] = safe_open(str(file), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for bad files
                raise UniversalError(f"cannot read {file}: {err}") from None
        return self._files[file]


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
    one parameter at a time, through ``writer`` (default: the whole shard into the parameter)."""
    writer = writer or ShardWriter()
    partitions = tp_partitions(model)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state.names()))
    if missing:
        raise UniversalError(f"{state.directory} has no weights for {missing[:5]}: it was written for another model")
    for name, param in params.items():
        shard = shard_full_tensor(state.tensor("param", name), partitions.get(name), tp)
        start, stop = writer.owned_range(param)
        writer.write(param, shard.reshape(-1)[start:stop].to(param.device))


def load_optimizer(engine, state: UniversalState) -> None:
    """Set the engine's fp32 master weights and Adam moments from ``state`` (after :func:`load_weights`)."""
    engine.prime_optimizer_states(int(state.meta["optimizer_step"]))
    partitions = tp_partitions(engine.module)
    for name, param in engine.module.named_parameters():
        for key in KEYS:
            full = state.tensor(key, name)
            engine.set_master_state(param, key, shard_full_tensor(full, partitions.get(name), engine.tp))
