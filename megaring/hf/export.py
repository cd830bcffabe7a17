"""Write a full (1, 1) megaring state dict as a Hugging Face checkpoint directory.

Layout, as ``transformers.save_pretrained`` writes it: ``config.json``, ``generation_config.json``,
``model.safetensors`` when the weights fit in one shard, else ``model-00001-of-0000N.safetensors``
... plus ``model.safetensors.index.json`` (``metadata.total_size`` in bytes and ``weight_map``),
and the given tokenizer files. Tensors get Hugging Face names (fused ``wqkv`` / ``w13`` split),
the real vocabulary (full state dicts never carry tp padding) and ``lm_head.weight`` only when the
embeddings are untied. The directory is written by the output-directory rule of
:mod:`megaring.outdir` (:data:`HF_OUTPUT`): under a temporary name, renamed into place, replacing
only an earlier export and only with ``overwrite=True``.

Weights stream: the source (:class:`TensorSource`, e.g. a checkpoint's layout-independent state)
hands over rows of one megaring tensor at a time (about ``chunk_bytes``), which are converted and
appended to their safetensors file at once, so the weights' peak memory is one chunk, whatever
the model's size. safetensors' own ``save_file`` wants every tensor of a file in memory
at once (and serialises a copy), so the files are written here, in its format: an 8-byte
little-endian header length, the JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor,
``__metadata__``; padded with spaces to 8 bytes), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from megaring.hf.config import hf_config_dict
from megaring.hf.names import hf_sources
from megaring.hf.weights import INDEX_FILE, SINGLE_FILE
from megaring.model.config import ModelConfig
from megaring.outdir import OwnOutput, writing

# What an exported directory holds (transformers' save_pretrained writes the same names).
HF_OUTPUT = OwnOutput("an exported Hugging Face model", markers=("config.json", "*.safetensors"),
                      entries=("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                               "tokenizer*", "special_tokens_map.json"))
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or ``"5GB"`` / ``"500MB"`` / ``"50KB"`` (powers of 10) / ``"2GiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size={size!r}: expected an int or a size like '5GB', '500MB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@runtime_checkable
class TensorSource(Protocol):
    """Full (1, 1) megaring tensors by name, read one at a time."""

    def names(self) -> list[str]: ...

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype, without reading the tensor."""

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (dim 0) of the tensor."""


class InMemory:
    """A :class:`TensorSource` over a state dict already in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self.tensors[name].shape), self.tensors[name].dtype

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name][start:stop].detach().cpu()


@dataclass(frozen=True)
class _Out:
    """One Hugging Face tensor: rows ``[start, stop)`` of megaring tensor ``source`` (None: all)."""

    hf_name: str
    source: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]
    dtype: torch.dtype  # written
    source_dtype: torch.dtype  # read

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _outputs(source: TensorSource, cfg: ModelConfig, dtype: torch.dtype | None) -> list[_Out]:
    """The Hugging Face tensors, in order (fused ``wqkv`` / ``w13`` split by rows)."""
    outs = []
    for name in source.names():
        shape, own_dtype = source.spec(name)
        parts = hf_sources(name, cfg)
        start = 0
        for hf_name, rows in parts:
            span = (start, start + rows) if len(parts) > 1 else None
            out_shape = (rows, *shape[1:]) if span else shape
            outs.append(_Out(hf_name, name, span, out_shape, dtype or own_dtype, own_dtype))
            start += rows
    return outs


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``max_bytes`` (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _chunks(out: _Out, source: TensorSource, chunk_bytes: int):
    """``out``'s rows, read, converted and made contiguous, about ``chunk_bytes`` at a time."""
    first, stop = out.rows or (0, out.shape[0])
    row_bytes = math.prod(out.shape[1:]) * max(out.dtype.itemsize, out.source_dtype.itemsize)
    step = max(1, chunk_bytes // row_bytes)
    for start in range(first, stop, step):
        yield source.read(out.source, start, min(start + step, stop)).to(out.dtype).contiguous()


def _write_safetensors(path: Path, outs: list[_Out], source: TensorSource, chunk_bytes: int) -> None:
    """One safetensors file of ``outs``, each tensor read, converted and written a chunk of rows at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for out in outs:
        header[out.hf_name] = {"dtype": _SAFETENSORS_DTYPES[out.dtype], "shape": list(out.shape),
                               "data_offsets": [offset, offset + out.nbytes]}
        offset += out.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for out in outs:
            begin = f.tell()
            for chunk in _chunks(out, source, chunk_bytes):
                f.write(chunk.reshape(-1).view(torch.uint8).numpy())
                del chunk  # before the next chunk is read
            if f.tell() - begin != out.nbytes:
                raise ValueError(f"{out.source}: {f.tell() - begin} bytes for {out.hf_name}, expected {out.nbytes}")


def _generation_config(cfg: ModelConfig) -> dict:
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    return {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}


def _write_weights(outs: list[_Out], source: TensorSource, directory: Path, max_bytes: int, chunk_bytes: int) -> None:
    by_name = {o.hf_name: o for o in outs}
    shards = plan_shards({o.hf_name: o.nbytes for o in outs}, max_bytes)
    if len(shards) == 1:
        names = {SINGLE_FILE: shards[0]}
    else:
        names = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    for file, shard in names.items():
        _write_safetensors(directory / file, [by_name[n] for n in shard], source, chunk_bytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(o.nbytes for o in outs)},
                 "weight_map": {n: file for file, shard in names.items() for n in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_hf_checkpoint(
    full_state: Mapping[str, torch.Tensor] | TensorSource,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_files: Iterable[str | Path] = (),
    extra_config: dict | None = None,
    chunk_bytes: int = 64 << 20,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write ``full_state`` (megaring names, see ``gather_full_state_dict``; or a :class:`TensorSource`
    that reads them one at a time) to ``out_dir``; return it.

    ``dtype``: cast the weights (default: keep theirs). ``extra_config``: keys added to config.json.
    ``chunk_bytes``: the rows of a tensor read and written at once (the peak memory of the weights).
    ``overwrite``: replace an earlier export at ``out_dir`` (anything else there is refused,
    :mod:`megaring.outdir`); ``inputs``: paths ``out_dir`` must not hold or lie in (besides the
    tokenizer files), e.g. the checkpoint the weights come from.
    """
    out = Path(out_dir)
    source = full_state if isinstance(full_state, TensorSource) else InMemory(full_state)
    outs = _outputs(source, cfg, dtype)
    unsupported = sorted({str(o.dtype) for o in outs if o.dtype not in _SAFETENSORS_DTYPES})
    if unsupported:
        raise ValueError(f"cannot write weights of dtype {unsupported}: use float32, bfloat16 or float16")
    config = {**hf_config_dict(cfg, dtype=outs[0].dtype), **(extra_config or {})}
    tokenizer_files = [Path(f) for f in tokenizer_files]
    missing = [str(f) for f in tokenizer_files if not f.is_file()]
    if missing:
        raise ValueError(f"tokenizer files not found: {missing}")
    with writing(out, HF_OUTPUT, inputs=[*inputs, *tokenizer_files], overwrite=overwrite) as tmp:
        _write_weights(outs, source, tmp, parse_size(max_shard_size), chunk_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(cfg), indent=2) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
    return out
