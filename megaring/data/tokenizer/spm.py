"""Sentencepiece tokenizers: an existing ``.model`` or one trained on a sample of text.

Trained models keep text exactly (identity normalization, no dummy prefix, whitespace kept,
byte fallback for any character outside the vocabulary), so ``decode(encode(s)) == s`` for
any string. The end-of-document id is sentencepiece's ``eos_id`` (``</s>``, id 2 in
trained models); decoding drops it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megaring.data.config import TokenizerConfig
from megaring.data.tokenizer.base import Tokenizer, TokenizerError

SPM_NAME = "tokenizer.model"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; by default no BOS and sentencepiece's ``eos_id`` as the end of document.

    ``files`` is the ``.model`` path or a ``{store name: path}`` dict whose first entry is it
    (``tokenizer.model``, then e.g. the ``tokenizer_config.json`` of a Hugging Face directory).
    """

    kind = "sentencepiece"

    def __init__(self, files: str | Path | dict[str, Path], *, bos_id: int | None = None,
                 eod_id: int | None = None):
        files = {SPM_NAME: Path(files)} if isinstance(files, (str, Path)) else files
        path = next(iter(files.values()))
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a sentencepiece model: {e}") from e
        if eod_id is None:
            eod_id = self.sp.eos_id()
            if eod_id < 0:
                raise TokenizerError(f"{path} has no end-of-document id (train it with eos_id >= 0)")
        super().__init__(files, bos_id=bos_id, eod_id=eod_id)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of each text, one thread: int32 arrays where this sentencepiece can, else lists."""
        try:
            return self.sp.encode(list(texts), num_threads=1, return_type="numpy")
        except (TypeError, ValueError):  # sentencepiece < 0.2.1 has no numpy output
            return [np.asarray(x, np.int32) for x in self.sp.encode(list(texts), num_threads=1)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @property
    def splits_at_newlines(self) -> bool:
        """Holds for models trained here (identity normalization, no dummy prefix, whitespace kept,
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


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, model_path: str | Path,
                    num_threads: int = 1) -> SentencePieceTokenizer:
    """Train a sentencepiece model on ``texts`` (fed line by line) and save it to ``model_path``."""
    lines = _training_lines(texts, cfg.max_sentence_bytes)
    first = next(lines, None)
    if first is None:
        raise TokenizerError("no text to train the tokenizer on: the input sample holds only blank lines")
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
    return SentencePieceTokenizer(model_path)


def _training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-blank lines, each at most ``max_bytes`` (sentencepiece trains on lines and skips longer
    ones: a long line is cut into pieces, so that text without newlines trains too)."""
    for text in texts:
        for line in text.splitlines():
            yield from (piece for piece in _cut(line, max_bytes) if piece.strip())


def _cut(line: str, max_bytes: int) -> Iterator[str]:
    """``line`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut after a space where the piece has
    one, never inside a character."""
    data = line.encode()
    while len(data) > max_bytes:
        cut = data.rfind(b" ", 0, max_bytes) + 1 or max_bytes
        while cut > 1 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to its character's start
            cut -= 1
        yield data[:cut].decode()
        data = data[cut:]
    yield data.decode()


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
