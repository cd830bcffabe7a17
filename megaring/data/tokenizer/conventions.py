"""A Hugging Face model directory's tokenizer conventions: which ids start and end a document.

Read from ``tokenizer_config.json`` (``add_bos_token``, ``bos_token``, ``eos_token``; tokens are
strings or ``{"content": ...}`` dicts), ``special_tokens_map.json`` (the same token names, older
checkpoints) and ``config.json`` / ``generation_config.json`` (``bos_token_id``, ``eos_token_id``).

BOS: ``add_bos_token`` decides when it is set (the token is ``bos_token``); otherwise the token
the tokenizer's own post-processor puts first, if any. End of document: ``eos_token``, else the
config's first ``eos_token_id``, else the model's own default (sentencepiece's ``eos_id``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megaring.data.tokenizer.base import TokenizerError

TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
MODEL_CONFIG, GENERATION_CONFIG = "config.json", "generation_config.json"
SIDE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)  # copied into a store with the model file


def read_json(path: Path) -> dict:
    """A JSON object file; :class:`TokenizerError` naming the file when it is unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({e}); fix or remove it") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}; fix or remove it")
    return data


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _token(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string, ``{"content": ...}`` or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ConfigIds:
    """``bos_token_id`` and ``eos_token_id`` (all of them: configs may list several) of a model config."""

    bos_id: int | None
    eos_ids: tuple[int, ...]


def config_ids(directory: Path) -> ConfigIds:
    """Special ids of ``config.json``, completed by ``generation_config.json`` (either may be absent)."""
    bos, eos = None, ()
    for name in (MODEL_CONFIG, GENERATION_CONFIG):
        cfg = _optional_json(directory / name)
        cfg = cfg.get("text_config", cfg) if "eos_token_id" not in cfg else cfg  # multimodal configs nest it
        if bos is None and isinstance(cfg.get("bos_token_id"), int):
            bos = cfg["bos_token_id"]
        value = cfg.get("eos_token_id")
        if not eos and value is not None:
            eos = tuple(int(v) for v in (value if isinstance(value, list) else [value]))
    return ConfigIds(bos, eos)


def document_ids(directory: Path, token_to_id: Callable[[str], int | None], *, model_file: Path,
                 added_bos: int | None, default_eos: int | None) -> tuple[int | None, int]:
    """``(bos_id or None, eod_id)`` of a tokenizer in ``directory`` (see the module docstring).

    ``added_bos`` is the id the tokenizer's post-processor puts first (None: none or unknown);
    ``default_eos`` the model's own end-of-sequence id (None: none).
    """
    tc_path = directory / TOKENIZER_CONFIG
    tc, stm = _optional_json(tc_path), _optional_json(directory / SPECIAL_TOKENS_MAP)

    def lookup(key: str) -> tuple[str, int] | None:
        token = _token(tc.get(key)) or _token(stm.get(key))
        if token is None:
            return None
        token_id = token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{tc_path}: {key} {token!r} is not in the vocabulary of {model_file}")
        return token, token_id

    bos_id = added_bos
    if "add_bos_token" in tc:
        bos_id = None
        if tc["add_bos_token"]:
            found = lookup("bos_token")
            if found is None:
                raise TokenizerError(f"{tc_path} sets add_bos_token but names no bos_token; add one")
            bos_id = found[1]
    found = lookup("eos_token")
    if found is not None:
        return bos_id, found[1]
    eos = config_ids(directory).eos_ids or ((default_eos,) if default_eos is not None else ())
    if not eos:
        raise TokenizerError(f"{directory}: no end-of-document token for {model_file}; name eos_token in "
                             f"{TOKENIZER_CONFIG} (or eos_token_id in {MODEL_CONFIG})")
    return bos_id, eos[0]
