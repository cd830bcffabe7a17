"""Write a full (1, 1) megaring state dict as a Hugging Face checkpoint directory.

Layout, as ``transformers.save_pretrained`` writes it: ``config.json``, ``generation_config.json``,
``model.safetensors`` when the weights fit in one shard, else ``model-00001-of-0000N.safetensors``
... plus ``model.safetensors.index.json`` (``metadata.total_size`` in bytes and ``weight_map``),
and the given tokenizer files. Tensors get Hugging Face names (fused ``wqkv`` / ``w13`` split),
the real vocabulary (full state dicts never carry tp padding) and ``lm_head.weight`` only when the
embeddings are untied. The directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from megaring.hf.config import hf_config_dict
from megaring.hf.names import to_hf_state_dict
from megaring.hf.weights import INDEX_FILE, SINGLE_FILE
from megaring.model.config import ModelConfig

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or ``"5GB"`` / ``"500MB"`` / ``"50KB"`` (powers of 10) / ``"2GiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size={size!r}: expected an int or a size like '5GB', '500MB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``max_bytes`` (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


def _generation_config(cfg: ModelConfig) -> dict:
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    return {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> None:
    shards = plan_shards(tensors, max_bytes)
    if len(shards) == 1:
        names = {SINGLE_FILE: shards[0]}
    else:
        names = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    for file, shard in names.items():
        # clone: split views share storage, which save_file refuses
        save_file({n: tensors[n].detach().cpu().contiguous().clone() for n in shard}, str(directory / file),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: file for file, shard in names.items() for n in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an existing ``out`` is moved aside first and then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def write_hf_checkpoint(
    full_state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_files: Iterable[str | Path] = (),
    extra_config: dict | None = None,
) -> Path:
    """Write ``full_state`` (megaring names, see ``gather_full_state_dict``) to ``out_dir``; return it.

    ``dtype``: cast the weights (default: keep theirs). ``extra_config``: keys added to config.json.
    """
    out = Path(out_dir)
    tensors = to_hf_state_dict(full_state, cfg)
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    written_dtype = dtype or next(iter(tensors.values())).dtype
    config = {**hf_config_dict(cfg, dtype=written_dtype), **(extra_config or {})}
    tokenizer_files = [Path(f) for f in tokenizer_files]
    missing = [str(f) for f in tokenizer_files if not f.is_file()]
    if missing:
        raise ValueError(f"tokenizer files not found: {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        _write_weights(tensors, tmp, parse_size(max_shard_size))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(cfg), indent=2) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
