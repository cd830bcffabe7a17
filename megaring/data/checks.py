"""Pre-flight checks the trainer runs before any collective: each returns every problem as a line.

- :func:`eval_data_problems`: a ``data.valid_path`` store must share the training data's
  tokenizer (vocabulary, model file hash, BOS and end-of-document ids).
- :func:`tokenizer_vocab_problems`: the data's ids must fit the model's embedding, and, with a
  Hugging Face checkpoint, come from the checkpoint's tokenizer and use its ``bos_token_id`` /
  ``eos_token_id``.
"""

from __future__ import annotations

from pathlib import Path

from megaring.data.dataset import open_dataset
from megaring.data.reader import DataInfo, describe_data, source_info
from megaring.data.tokenizer import MODEL_FILES, TokenizerError, file_sha256
from megaring.data.tokenizer.conventions import MODEL_CONFIG, config_ids


def _where(info: DataInfo) -> str:
    return info.path or f"the {info.kind} data"


def eval_data_problems(cfg) -> list[str]:
    """Problems of the validation data of ``cfg`` (none without ``data.valid_path``)."""
    if cfg.problems() or not cfg.valid_path:
        return cfg.problems()
    try:
        train = describe_data(cfg)
        valid = source_info("files", open_dataset(cfg.valid_path))
    except ValueError as e:  # StoreError, TokenizerError and config problems are ValueErrors
        return [str(e)]
    fix = (f"re-run megaring-preprocess on the validation text with the training data's tokenizer "
           f"(tokenizer.model={train.path or '<the training tokenizer>'})")
    out = []
    for name in ("vocab_size", "eod_id", "bos_id", "tokenizer_sha256"):
        ours, theirs = getattr(valid, name), getattr(train, name)
        if name == "tokenizer_sha256" and None in (ours, theirs):
            continue  # a store written from token ids has no tokenizer file to compare
        if ours != theirs:
            out.append(f"data.valid_path={valid.path} has {name} {ours}, the training data {_where(train)} "
                       f"has {theirs}: {fix}")
    return out


def tokenizer_vocab_problems(info: DataInfo, model_vocab_size: int, *,
                             checkpoint_dir: str | None = None) -> list[str]:
    """Problems of training a model of ``model_vocab_size`` (from ``checkpoint_dir``, if given) on ``info``."""
    out = []
    if info.vocab_size > model_vocab_size:
        out.append(f"{_where(info)} has vocab_size {info.vocab_size}, more than the model's {model_vocab_size}: "
                   "ids past the embedding would fail; tokenize with the model's tokenizer or use a model with "
                   f"vocab_size >= {info.vocab_size}")
    if checkpoint_dir is None or info.kind == "mock":
        return out
    ckpt = Path(checkpoint_dir)
    if not (ckpt / MODEL_CONFIG).is_file():
        return out + [f"{ckpt} has no {MODEL_CONFIG}: the checkpoint must be a Hugging Face model directory"]
    fix = f"re-run megaring-preprocess with tokenizer.model={ckpt}"
    out.extend(_tokenizer_file_problems(info, ckpt, fix))
    try:
        ids = config_ids(ckpt)
    except TokenizerError as e:
        return out + [str(e)]
    if ids.eos_ids and info.eod_id not in ids.eos_ids:
        out.append(f"{_where(info)} ends documents with id {info.eod_id}, but {ckpt / MODEL_CONFIG} has "
                   f"eos_token_id {list(ids.eos_ids)}: {fix}")
    if info.bos_id is not None and ids.bos_id is not None and info.bos_id != ids.bos_id:
        out.append(f"{_where(info)} starts documents with id {info.bos_id}, but {ckpt / MODEL_CONFIG} has "
                   f"bos_token_id {ids.bos_id}: {fix}")
    return out


def _tokenizer_file_problems(info: DataInfo, ckpt: Path, fix: str) -> list[str]:
    """The data's tokenizer model file against the checkpoint's file of the same name."""
    if not info.tokenizer_files:
        return []
    ours = Path(info.tokenizer_files[0])
    theirs = ckpt / ours.name
    if theirs.is_file():
        if file_sha256(theirs) != info.tokenizer_sha256:
            return [f"{ours} (the data's tokenizer) differs from {theirs} (sha256): the data was tokenized with "
                    f"another tokenizer; {fix}"]
        return []
    present = [name for name in MODEL_FILES if (ckpt / name).is_file()]
    if present:
        return [f"{ckpt} holds {', '.join(present)} but the data {_where(info)} was tokenized with {ours.name}: {fix}"]
    return []
