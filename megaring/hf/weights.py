"""Load a Hugging Face safetensors checkpoint into a (cp, tp) model, each tp rank reading only its shard.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}``). Tensors are read with
``safe_open(...).get_slice(name)[rows or cols]`` (memory-mapped), so tp rank ``i`` reads:

- fused ``wqkv`` (rows ``[Q_i; K_i; V_i]``): its rows of ``q_proj``, ``k_proj``, ``v_proj``;
- fused ``w13`` (rows ``[W1_i; W3_i]``): its rows of ``gate_proj`` and ``up_proj``;
- row-parallel ``wo`` / ``w2``: its columns of ``o_proj`` / ``down_proj``;
- vocab-parallel ``embed_tokens`` / ``lm_head``: its rows of the vocabulary padded to a multiple
  of tp; rows past the real vocabulary are zeros, not read;
- norms and row-parallel biases: the whole (small) tensor.

No rank holds more than its shard of a parameter. Every problem (missing config.json, file,
tensor, wrong shape, unreadable header, unsupported architecture, config mismatch) is checked
before any weight is copied and raised at once as a :class:`CheckpointError` naming the files.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from megaring.hf.config import checkpoint_signature, model_config_from_hf
from megaring.hf.names import hf_sources
from megaring.model.config import ModelConfig
from megaring.model.context import ParallelContext
from megaring.model.init import full_shape, tp_partitions

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be loaded; the message names the files."""


@dataclass(frozen=True)
class LoadReport:
    """What this rank read: bytes of tensor data and the weight files it opened."""

    bytes_read: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class _Piece:
    """Rows (dim 0) or columns (dim 1) ``[start, stop)`` of one HF tensor, then ``pad`` zero rows."""

    hf_name: str
    full_shape: tuple[int, ...]
    dim: int | None  # None: the whole tensor
    start: int = 0
    stop: int = 0
    pad: int = 0


def read_weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> weight file name, from the index or the single ``model.safetensors``."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from err
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # SafetensorError and OSError: corrupt or unreadable file
        raise CheckpointError(f"{path}: cannot read the safetensors file ({err})") from err


def _pieces(name: str, param: torch.Tensor, partition, cfg: ModelConfig, ctx: ParallelContext) -> list[_Piece]:
    """How this rank's shard of parameter ``name`` is read, in concatenation order."""
    rank, size = ctx.tp.rank, ctx.tp.size
    full = full_shape(param, partition, size)
    sources = hf_sources(name, cfg)
    if partition is None:
        return [_Piece(hf, full, None) for hf, _ in sources]
    if partition.dim == 1:  # row-parallel: columns, one source
        (start, stop), = partition.local_ranges(rank, size)
        return [_Piece(sources[0][0], full, 1, start, stop)]
    pieces = []
    for (hf, rows), (start, stop) in zip(sources, partition.local_ranges(rank, size)):
        real_stop = min(stop, rows)  # the vocabulary's padding rows are not in the file
        pieces.append(_Piece(hf, (rows, *full[1:]), 0, min(start, real_stop), real_stop, stop - max(start, real_stop)))
    return pieces


def _plan(model, ctx: ParallelContext) -> dict[str, list[_Piece]]:
    partitions = tp_partitions(model)
    return {name: _pieces(name, p, partitions.get(name), model.cfg, ctx) for name, p in model.named_parameters()}


def _check(plan, weight_map, directory: Path, stack: ExitStack) -> tuple[dict, list[str]]:
    """Open every needed file once; every missing file or tensor and wrong shape."""
    handles, problems = {}, []
    for piece in (p for pieces in plan.values() for p in pieces):
        file = weight_map.get(piece.hf_name)
        if file is None:
            problems.append(f"{directory}: missing tensor {piece.hf_name!r}")
            continue
        if file not in handles:
            path = directory / file
            if not path.is_file():
                problems.append(f"{path}: missing weight file (named for {piece.hf_name!r})")
                handles[file] = None
                continue
            try:
                handles[file] = stack.enter_context(_open(path))
            except CheckpointError as err:
                problems.append(str(err))
                handles[file] = None
                continue
        if handles[file] is None:
            continue
        if piece.hf_name not in handles[file].keys():
            problems.append(f"{directory / file}: missing tensor {piece.hf_name!r} (named by the index)")
            continue
        shape = tuple(handles[file].get_slice(piece.hf_name).get_shape())
        if shape != piece.full_shape:
            problems.append(f"{directory / file}: tensor {piece.hf_name!r} has shape {shape}, "
                            f"expected {piece.full_shape}")
    return handles, problems


def _read(piece: _Piece, handle) -> tuple[torch.Tensor, int]:
    """The piece (zero padding rows appended) and the bytes read from the file for it."""
    tensor_slice = handle.get_slice(piece.hf_name)
    if piece.dim is None:
        out = tensor_slice[:]
    elif piece.dim == 1:
        out = tensor_slice[:, piece.start:piece.stop]
    else:
        out = tensor_slice[piece.start:piece.stop]
    nbytes = out.numel() * out.element_size()
    if piece.pad:
        out = torch.cat([out, out.new_zeros((piece.pad, *out.shape[1:]))])
    return out, nbytes


def _config_problems(model_cfg: ModelConfig, directory: Path) -> list[str]:
    hf_cfg = model_config_from_hf(directory)  # raises for a missing config.json or an unsupported model
    want, got = checkpoint_signature(hf_cfg), checkpoint_signature(model_cfg)
    return [f"{directory / 'config.json'}: {k}={want[k]!r}, the model has {got[k]!r}"
            for k in want if want[k] != got[k]]


@torch.no_grad()
def load_hf_weights(model, ctx: ParallelContext, directory: str | Path) -> LoadReport:
    """Copy this rank's shards of the checkpoint in ``directory`` into ``model`` (no communication)."""
    directory = Path(directory)
    problems = _config_problems(model.cfg, directory)
    weight_map = read_weight_map(directory)
    plan = _plan(model, ctx)
    params = dict(model.named_parameters())
    with ExitStack() as stack:
        handles, found = _check(plan, weight_map, directory, stack)
        problems += found
        if problems:
            raise CheckpointError("cannot load the Hugging Face checkpoint:\n  - " + "\n  - ".join(problems))
        bytes_read = 0
        for name, pieces in plan.items():
            parts, sizes = zip(*(_read(p, handles[weight_map[p.hf_name]]) for p in pieces))
            bytes_read += sum(sizes)
            dim = pieces[0].dim or 0
            params[name].copy_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim))
        files = tuple(sorted(f for f, h in handles.items() if h is not None))
    return LoadReport(bytes_read=bytes_read, files=files)
