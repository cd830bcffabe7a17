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

No rank holds more than its shard of a parameter. With a ``writer`` that stores only part of
each shard (ZeRO-3's partition: ``megaring.engine.deepspeed_engine.ZeroPartitionWriter``) a rank reads only
the rows of its shard that hold its flat elements, so it holds its partition plus one partition's
worth of one tensor. Every problem (missing config.json, file,
tensor, wrong shape, unreadable header, unsupported architecture, config mismatch, a tensor the
model has no parameter for) is checked before any weight is copied and raised at once as a
:class:`CheckpointError` naming the files; :func:`checkpoint_problems` makes the same checks from
the headers alone, for the trainer to run before any collective. Each piece read is checked to be
finite: NaN or inf in the files is the checkpoint's fault, and said so, not a divergence later.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from megaring.errors import BadInput
from megaring.hf.config import checkpoint_signature, model_config_from_hf
from megaring.hf.names import hf_sources
from megaring.model.config import ModelConfig
from megaring.model.context import ParallelContext
from megaring.model.init import ShardWriter, tp_partitions
from megaring.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
OTHER_FORMATS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
LISTED = 5  # names shown in a message about many tensors


class CheckpointError(BadInput):
    """A Hugging Face checkpoint that cannot be loaded; the message names the files (exit status 2)."""


def name_list(names: list[str]) -> str:
    """The first :data:`LISTED` names quoted, and how many more."""
    shown = ", ".join(repr(n) for n in names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


@dataclass(frozen=True)
class LoadReport:
    """What this rank read: bytes of tensor data, the weight files it opened, and the most bytes of
    one parameter's rows it held at once (besides the parameters)."""

    bytes_read: int
    files: tuple[str, ...]
    largest_held: int = 0


@dataclass(frozen=True)
class _Piece:
    """Rows (dim 0) or columns (dim 1) ``[start, stop)`` of one HF tensor, then ``pad`` zero rows."""

    hf_name: str
    full_shape: tuple[int, ...]
    dim: int | None  # None: the whole tensor
    start: int = 0
    stop: int = 0
    pad: int = 0

    @property
    def local_rows(self) -> int:
        """Rows this piece adds to the rank's shard (dim 0 of the shard)."""
        return self.stop - self.start + self.pad if self.dim == 0 else self.full_shape[0]


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
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory (model.init_from names a Hugging Face checkpoint)")
    other = [name for name in OTHER_FORMATS if (directory / name).exists()]
    hint = (f"; it holds {other[0]}: megaring reads safetensors only, convert it with transformers "
            "(from_pretrained, then save_pretrained)") if other else ""
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # SafetensorError and OSError: corrupt or unreadable file
        raise CheckpointError(f"{path}: cannot read the safetensors file ({err})") from err


def _pieces(name: str, shape: torch.Size, partition, cfg: ModelConfig, ctx: ParallelContext) -> list[_Piece]:
    """How this rank's shard (of ``shape``) of parameter ``name`` is read, in concatenation order."""
    rank, size = ctx.tp.rank, ctx.tp.size
    full = tuple(shape) if partition is None else partition.full_shape(shape, size)
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


def _plan(model, ctx: ParallelContext, writer: ShardWriter) -> dict[str, list[_Piece]]:
    partitions = tp_partitions(model)
    return {name: _pieces(name, writer.shard_shape(p), partitions.get(name), model.cfg, ctx)
            for name, p in model.named_parameters()}


def _check(plan, weight_map, directory: Path, stack: ExitStack) -> tuple[dict, list[str]]:
    """Open every needed file once; every missing file or tensor and wrong shape."""
    handles, problems, missing = {}, [], []
    for piece in (p for pieces in plan.values() for p in pieces):
        file = weight_map.get(piece.hf_name)
        if file is None:
            missing.append(piece.hf_name)
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
    return handles, _missing_problems(missing, directory) + problems


def _missing_problems(missing: list[str], directory: Path) -> list[str]:
    """One line per missing tensor, or one line for many; biases only: the config's architecture is wrong."""
    if len(missing) <= 3:
        return [f"{directory}: missing tensor {name!r}" for name in missing]
    hint = ""
    if all(name.endswith(".bias") for name in missing):
        hint = (f" (every one a bias: {directory / 'config.json'} names an architecture with biases, the "
                "weights have none; correct 'architectures' / attention_bias / mlp_bias there)")
    return [f"{directory}: {len(missing)} tensors missing: {name_list(missing)}{hint}"]


def unused_problems(plan: dict[str, list[_Piece]], weight_map: dict[str, str], cfg: ModelConfig,
                    directory: Path) -> list[str]:
    """Tensors in the files that no parameter reads (say, a layer past ``num_hidden_layers``), unless
    ``cfg.allow_unused_weights``. Not counted: a tied model's ``lm_head.weight`` and RoPE's
    ``inv_freq`` buffers, which the config accounts for (transformers ignores them too)."""
    used = {piece.hf_name for pieces in plan.values() for piece in pieces}
    unused = sorted(name for name in set(weight_map) - used if not name.endswith("rotary_emb.inv_freq")
                    and not (cfg.tie_embeddings and name == "lm_head.weight"))
    if not unused or cfg.allow_unused_weights:
        return []
    return [f"{directory}: {len(unused)} tensor{'s' * (len(unused) > 1)} that the config "
            f"({cfg.n_layers} layers, tied embeddings: {cfg.tie_embeddings}) has no parameter for: "
            f"{name_list(unused)}; correct config.json, or set model.allow_unused_weights=true to leave "
            f"{'them' if len(unused) > 1 else 'it'} out"]


def _read(piece: _Piece, handle, lo: int, hi: int) -> tuple[torch.Tensor, int]:
    """Rows ``[lo, hi)`` of the piece's part of the shard (zero padding rows past the file's) and
    the bytes read from the file for them."""
    tensor_slice = handle.get_slice(piece.hf_name)
    if piece.dim == 1:
        out = tensor_slice[lo:hi, piece.start:piece.stop]
        return out, out.nbytes
    real = piece.stop - piece.start if piece.dim == 0 else piece.full_shape[0]
    out = tensor_slice[piece.start + lo:piece.start + min(hi, real)] if lo < real else None
    nbytes = 0 if out is None else out.nbytes
    pad = hi - max(lo, real)
    if pad <= 0:
        return out, nbytes
    zeros = torch.zeros((pad, *piece.full_shape[1:]), dtype=torch.float32 if out is None else out.dtype)
    return (zeros if out is None else torch.cat([out, zeros])), nbytes


@dataclass(frozen=True)
class _Loaded:
    """What loading one parameter took: bytes read, bytes of rows held, HF tensors with NaN or inf."""

    nbytes: int = 0
    held: int = 0
    nonfinite: tuple[str, ...] = ()


def _read_rows(pieces: list[_Piece], handles: list, lo: int, hi: int) -> tuple[torch.Tensor, _Loaded]:
    """Rows ``[lo, hi)`` of this rank's shard, the pieces' rows concatenated (a row-parallel weight
    has one piece, its columns), and what was read (the pieces that hold NaN or inf named)."""
    parts, nbytes, offset, nonfinite = [], 0, 0, []
    for piece, handle in zip(pieces, handles):
        a, b = max(lo, offset), min(hi, offset + piece.local_rows)
        if a < b:
            part, n = _read(piece, handle, a - offset, b - offset)
            parts.append(part)
            nbytes += n
            if not torch.isfinite(part).all():
                nonfinite.append(piece.hf_name)
        offset += piece.local_rows
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return rows, _Loaded(nbytes, rows.nbytes, tuple(nonfinite))


def _load_param(param, pieces: list[_Piece], handles: list, writer: ShardWriter) -> _Loaded:
    """Write the elements of ``param``'s shard this rank stores, from the rows that hold them."""
    shape = writer.shard_shape(param)
    row = math.prod(shape[1:])
    start, stop = writer.owned_range(param)
    if stop <= start:  # a ZeRO partition of padding only
        writer.write(param, torch.empty(0))
        return _Loaded()
    lo, hi = start // row, -(-stop // row)  # the rows holding the owned elements
    rows, loaded = _read_rows(pieces, handles, lo, hi)  # (hi - lo, *shape[1:])
    writer.write(param, rows.reshape(-1)[start - lo * row:stop - lo * row])
    return loaded


def _config_problems(model_cfg: ModelConfig, directory: Path) -> list[str]:
    hf_cfg = model_config_from_hf(directory)  # raises for a missing config.json or an unsupported model
    want, got = checkpoint_signature(hf_cfg), checkpoint_signature(model_cfg)
    return [f"{directory / 'config.json'}: {k}={want[k]!r}, the model has {got[k]!r}"
            for k in want if want[k] != got[k]]


def _nonfinite_error(names: list[str], weight_map: dict[str, str], directory: Path) -> CheckpointError:
    files = sorted({str(directory / weight_map[name]) for name in names})
    many = len(names) > 1
    return CheckpointError(
        f"cannot load the Hugging Face checkpoint: {len(names)} tensor{'s' * many} of {', '.join(files)} "
        f"{'hold' if many else 'holds'} NaN or inf values: {name_list(names)}. The checkpoint is damaged "
        "(no learning rate gives finite losses from it): download or export it again")


def checkpoint_problems(cfg: ModelConfig, directory: str | Path) -> list[str]:
    """Every problem of the checkpoint in ``directory`` for a model of ``cfg``, from the safetensors
    headers alone (no weight is read, no model built): missing or unreadable files, missing tensors,
    wrong shapes, unused tensors. What the trainer checks on every rank before any collective."""
    directory = Path(directory)
    try:
        weight_map = read_weight_map(directory)
    except CheckpointError as err:
        return [str(err)]
    ctx = ParallelContext.single()
    with torch.device("meta"):  # the full (1, 1) shapes, without memory
        plan = _plan(Transformer(cfg, ctx), ctx, ShardWriter())
    with ExitStack() as stack:
        problems = _check(plan, weight_map, directory, stack)[1]
    return problems + unused_problems(plan, weight_map, cfg, directory)


@torch.no_grad()
def load_hf_weights(model, ctx: ParallelContext, directory: str | Path,
                    writer: ShardWriter | None = None) -> LoadReport:
    """Copy this rank's shards of the checkpoint in ``directory`` into ``model`` (no communication),
    one parameter at a time, through ``writer`` (default: the whole shard into the parameter).
    Raises :class:`CheckpointError` before copying for a file problem, after it for NaN or inf."""
    directory = Path(directory)
    writer = writer or ShardWriter()
    problems = _config_problems(model.cfg, directory)
    weight_map = read_weight_map(directory)
    plan = _plan(model, ctx, writer)
    params = dict(model.named_parameters())
    with ExitStack() as stack:
        handles, found = _check(plan, weight_map, directory, stack)
        problems += found + unused_problems(plan, weight_map, model.cfg, directory)
        if problems:
            raise CheckpointError("cannot load the Hugging Face checkpoint:\n  - " + "\n  - ".join(problems))
        loaded = [_load_param(params[name], pieces, [handles[weight_map[p.hf_name]] for p in pieces], writer)
                  for name, pieces in plan.items()]
        files = tuple(sorted(f for f, h in handles.items() if h is not None))
    nonfinite = [name for one in loaded for name in one.nonfinite]
    if nonfinite:
        raise _nonfinite_error(nonfinite, weight_map, directory)
    return LoadReport(bytes_read=sum(one.nbytes for one in loaded), files=files,
                      largest_held=max(one.held for one in loaded))
