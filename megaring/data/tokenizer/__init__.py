"""Tokenizers: sentencepiece ``.model`` files and Hugging Face ``tokenizers`` models, one interface.

:func:`load_tokenizer` takes what ``megaring-preprocess tokenizer.model=<path>`` names:

- a Hugging Face model directory: its ``tokenizer.json`` (or, without one, its ``tokenizer.model``)
  with the directory's conventions (:mod:`megaring.data.tokenizer.conventions`);
- a ``tokenizer.json`` file: the same, conventions read from the files beside it;
- a sentencepiece ``.model`` file: no BOS, sentencepiece's ``eos_id`` ends documents (as always).
"""

from __future__ import annotations

from pathlib import Path

from megaring.data.tokenizer.base import Tokenizer, TokenizerError, file_sha256
from megaring.data.tokenizer.conventions import SIDE_FILES, document_ids
from megaring.data.tokenizer.hf import JSON_NAME, HFTokenizer, load_json_tokenizer, post_processor_bos
from megaring.data.tokenizer.spm import SPM_NAME, SentencePieceTokenizer, train_tokenizer

KINDS = {cls.kind: cls for cls in (SentencePieceTokenizer, HFTokenizer)}
MODEL_FILES = (JSON_NAME, SPM_NAME)  # the files that define the ids, in order of preference

__all__ = ["HFTokenizer", "KINDS", "MODEL_FILES", "SentencePieceTokenizer", "Tokenizer", "TokenizerError",
           "file_sha256", "load_tokenizer", "train_tokenizer"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer ``path`` names (see the module docstring); errors name the path."""
    path = Path(path)
    if path.is_dir():
        if (path / JSON_NAME).is_file():
            return _load_json(path / JSON_NAME)
        if (path / SPM_NAME).is_file():
            return _load_spm_dir(path)
        raise TokenizerError(f"{path} holds neither {JSON_NAME} nor {SPM_NAME}; point tokenizer.model at a "
                             "Hugging Face model directory, a tokenizer.json or a sentencepiece .model")
    if not path.exists():
        raise TokenizerError(f"tokenizer model {path} does not exist")
    if path.suffix == ".json":
        return _load_json(path)
    return SentencePieceTokenizer(path)


def _side_files(directory: Path) -> dict[str, Path]:
    return {name: directory / name for name in SIDE_FILES if (directory / name).is_file()}


def _load_json(json_path: Path) -> HFTokenizer:
    tk = load_json_tokenizer(json_path)
    bos_id, eod_id = document_ids(json_path.parent, tk.token_to_id, model_file=json_path,
                                  added_bos=post_processor_bos(tk), default_eos=None)
    return HFTokenizer({JSON_NAME: json_path, **_side_files(json_path.parent)}, bos_id=bos_id, eod_id=eod_id)


def _load_spm_dir(directory: Path) -> SentencePieceTokenizer:
    plain = SentencePieceTokenizer(directory / SPM_NAME, eod_id=0)  # the real ids are decided below
    sp = plain.sp

    def token_to_id(piece: str) -> int | None:
        i = sp.piece_to_id(piece)
        return i if sp.id_to_piece(i) == piece else None

    bos_id, eod_id = document_ids(directory, token_to_id, model_file=plain.path, added_bos=None,
                                  default_eos=sp.eos_id() if sp.eos_id() >= 0 else None)
    return SentencePieceTokenizer({SPM_NAME: plain.path, **_side_files(directory)}, bos_id=bos_id, eod_id=eod_id)
