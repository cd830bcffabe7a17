"""Hugging Face ``tokenizers`` models (``tokenizer.json``: BPE models such as Llama 3 and Qwen).

The one module that talks to the ``tokenizers`` library. Texts are encoded without the
post-processor's special tokens; the BOS and end-of-document ids are added by the encoder
from the recorded conventions (:mod:`megaring.data.tokenizer.conventions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers

from megaring.data.tokenizer.base import Tokenizer, TokenizerError

JSON_NAME = "tokenizer.json"


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json``; ``files`` maps store names to paths, ``tokenizer.json`` first."""

    kind = "tokenizers"

    def __init__(self, files: dict[str, Path], *, bos_id: int | None, eod_id: int):
        path = next(iter(files.values()))
        self.tk = load_json_tokenizer(path)
        largest = max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1)
        self._vocab_size = max(self.tk.get_vocab_size(with_added_tokens=True), largest + 1)
        super().__init__(files, bos_id=bos_id, eod_id=eod_id)

    @property
    def vocab_size(self) -> int:
        """Size with added tokens; at least one past the largest id (added ids may leave gaps)."""
        return self._vocab_size

    @property
    def splits_at_newlines(self) -> bool:
        """False: pre-tokenizers such as Llama 3's group runs of newlines, so texts are encoded whole."""
        return False

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.tk.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)


def load_json_tokenizer(path: Path) -> tokenizers.Tokenizer:
    """``tokenizers.Tokenizer.from_file`` with errors that name the file."""
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json ({e}); "
                             "point tokenizer.model at a tokenizer.json, its directory or a .model") from e


def post_processor_bos(tk: tokenizers.Tokenizer) -> int | None:
    """The special id the post-processor puts before a text's ids, if any (e.g. ``<|begin_of_text|>``)."""
    encoding = tk.encode("a", add_special_tokens=True)
    if encoding.ids and encoding.special_tokens_mask[0]:
        return encoding.ids[0]
    return None
