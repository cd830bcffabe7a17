"""Sentencepiece tokenizer: load an existing model or train one on a sample of text.

Trained models keep text exactly (identity normalization, no dummy prefix, whitespace kept,
byte fallback for any character outside the vocabulary), so ``decode(encode(s)) == s`` for
any string. The end-of-document id is sentencepiece's ``eos_id`` (``</s>``, id 2 in
trained models); decoding drops it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from megaring.data.config import TokenizerConfig


class TokenizerError(ValueError):
    """A tokenizer model that cannot be loaded or trained."""


class Tokenizer:
    """A loaded sentencepiece model with the end-of-document id."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer model {self.path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path} is not a sentencepiece model: {e}") from e
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{self.path} has no end-of-document id (train it with eos_id >= 0)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document id)."""
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; end-of-document ids decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def sha256(self) -> str:
        return file_sha256(self.path)

    @property
    def splits_at_newlines(self) -> bool:
        """True when encoding text in pieces cut after newlines gives the same ids as encoding it whole.

        Holds for models trained here (identity normalization, no dummy prefix, whitespace kept,
        no piece holding a newline); such text is encoded in pieces, which is several times faster
        for long documents. Unknown models (or no ``protobuf`` to inspect them) are encoded whole.
        """
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError:
            return False
        proto = pb.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        norm = proto.normalizer_spec
        return (norm.name == "identity" and not norm.add_dummy_prefix and not norm.remove_extra_whitespaces
                and not any("\n" in piece.piece for piece in proto.pieces))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, model_path: str | Path,
                    num_threads: int = 1) -> Tokenizer:
    """Train a sentencepiece model on ``texts`` (fed line by line) and save it to ``model_path``."""
    lines = _training_lines(texts, cfg.max_sentence_bytes)
    first = next(lines, None)
    if first is None:
        raise TokenizerError("no text to train the tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_prepend(first, lines), model_writer=model,
            vocab_size=cfg.vocab_size, model_type=cfg.type, character_coverage=cfg.character_coverage,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=cfg.max_sentence_bytes, input_sentence_size=4_000_000,
            shuffle_input_sentence=True, num_threads=max(1, num_threads), minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"training a {cfg.type} tokenizer with vocab_size={cfg.vocab_size} failed: {e} "
                             "(set tokenizer.vocab_size: a small corpus allows only a small vocabulary, and it "
                             "must hold 256 byte pieces plus the corpus's characters)") from e
    Path(model_path).write_bytes(model.getvalue())
    return Tokenizer(model_path)


def _training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-blank lines short enough for the trainer (sentencepiece trains on lines)."""
    for text in texts:
        for line in text.splitlines():
            if line.strip() and len(line.encode()) <= max_bytes:
                yield line


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
