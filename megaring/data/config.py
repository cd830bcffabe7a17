"""Typed configs of the data package: the ``data`` group (:class:`DataConfig`) and the
``megaring-preprocess`` command (:class:`PreprocessConfig`).

Dataclasses are the schema; Hydra YAML under ``megaring/configs/`` composes and overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megaring.data.balance import BALANCE
from megaring.data.mixture import source_problems

DATA_KINDS = ("mock", "files", "mixture")
SPLITS = ("train", "valid")
TOKENIZER_TYPES = ("bpe", "unigram")
FORMATS = ("auto", "text", "chat", "prompt_completion")  # megaring-preprocess format=
TRAIN_ON = ("assistant", "last_assistant", "all")  # megaring-preprocess data.train_on=


@dataclass
class DataConfig:
    """Where training samples come from (Hydra schema of the ``data`` group).

    ``kind="files"`` reads a token store written by ``megaring-preprocess`` at ``path``;
    ``kind="mock"`` generates deterministic documents on the fly (no files). Both go
    through the same packing, sample index and sharded reader.
    """

    kind: str = "mock"  # "mock" | "files"
    path: str | None = None  # token store directory (kind=files)
    split: str = "train"  # "train" | "valid"
    # The last ``valid_fraction`` of the documents (at least one when > 0) form the "valid" split.
    valid_fraction: float = 0.0
    # A separate token store for evaluation (the whole store is the split); instead of valid_fraction.
    valid_path: str | None = None
    # True: positions restart at 0 at every document start and at the sample start.
    # False: positions run 0..seq_len-1 across the whole sample.
    reset_positions: bool = True
    # kind=mixture: {<name>: {path, weight, valid_fraction, max_epochs}} (megaring.data.mixture)
    sources: dict[str, Any] = field(default_factory=dict)
    # A run in stages: [{steps, seq_len, global_batch_size, sources: {<name>: weight}, rope_theta,
    # rope_scaling}, ...] whose steps add up to trainer.max_steps (megaring.train.stages).
    stages: list[Any] = field(default_factory=list)
    # Where sample indices are cached; None: ``<path>/index`` (kind=files), memory only (mock).
    index_dir: str | None = None
    # Also check the .bin checksum when opening (reads the whole file once).
    verify_checksum: bool = False
    # Which dp rank and micro-batch takes which sample of a step (megaring.data.balance):
    # "none" in order, "work" evens out the attention work (same samples, same loss).
    balance: str = "none"  # "none" | "work"
    # Mock source only.
    vocab_size: int = 512  # the end-of-document id is vocab_size - 1
    num_tokens: int = 1 << 24  # size of the mock corpus
    mean_doc_len: int = 2048  # document lengths ~ 1 + Exponential(mean - 1) ...
    max_doc_len: int = 1 << 20  # ... capped here
    mock_seed: int = 0  # seeds the documents; the sample order uses the trainer's seed

    def problems(self) -> list[str]:
        """Every invariant this config breaks, as readable lines (empty when valid)."""
        out = []
        if self.kind not in DATA_KINDS:
            out.append(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind == "files" and not self.path:
            out.append("data.path must name a directory written by megaring-preprocess when data.kind=files")
        if self.kind == "mixture":
            out += source_problems(self.sources)
            out += [f"data.{k} is not used with data.kind=mixture: give each source its own under data.sources"
                    for k in ("path", "valid_path") if getattr(self, k)]
            if self.valid_fraction:
                out.append("data.valid_fraction is not used with data.kind=mixture: set "
                           "data.sources.<name>.valid_fraction")
        elif self.sources:
            out.append(f"data.sources is only read with data.kind=mixture (data.kind={self.kind!r})")
        if self.split not in SPLITS:
            out.append(f"data.split must be one of {SPLITS}, got {self.split!r}")
        if self.balance not in BALANCE:
            out.append(f"data.balance must be one of {BALANCE}, got {self.balance!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            out.append(f"data.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.split == "valid" and self.valid_fraction == 0.0:
            out.append("data.split=valid needs data.valid_fraction > 0")
        if self.valid_path and self.valid_fraction > 0:
            out.append("set either data.valid_path (a separate store) or data.valid_fraction (the tail of "
                       "data.path), not both")
        if self.kind == "mock":
            if self.vocab_size < 2:
                out.append(f"data.vocab_size must be >= 2 for the mock source, got {self.vocab_size}")
            if self.mean_doc_len < 1 or self.max_doc_len < 1:
                out.append("data.mean_doc_len and data.max_doc_len must be >= 1")
            if self.num_tokens < 2:
                out.append(f"data.num_tokens must be >= 2, got {self.num_tokens}")
        return out


@dataclass
class TokenizerConfig:
    """The tokenizer: an existing one (``model``) or a sentencepiece model trained on a sample of the input.

    ``model`` names a sentencepiece ``.model``, a Hugging Face ``tokenizer.json``, or a Hugging
    Face model directory (its ``tokenizer.json``, else its ``tokenizer.model``), whose BOS and
    end-of-document conventions are followed. The other fields only matter for training.
    """

    model: str | None = None  # .model | tokenizer.json | HF model dir; None: train one and store it
    vocab_size: int = 8192
    type: str = "bpe"  # "bpe" | "unigram"
    sample_bytes: int = 16 << 20  # at most this much text is used for training
    character_coverage: float = 0.9995
    max_sentence_bytes: int = 16384  # longer training lines are cut into pieces of at most this size
    # format=chat: a jinja file that replaces the checkpoint's chat template (or supplies a missing one).
    chat_template: str | None = None


@dataclass
class LossMaskConfig:
    """Which tokens of chat records are trained (``megaring-preprocess data.train_on=...``)."""

    train_on: str = "assistant"  # "assistant" | "last_assistant" | "all"


@dataclass
class PreprocessConfig:
    """``megaring-preprocess``: text / JSONL (``.gz`` too), Parquet or ``stdlib`` -> a token store directory."""

    input: Any = "???"  # file, directory, glob, a list of those, or "stdlib"
    output: str = "???"
    workers: int = 2  # encoding processes; 0 encodes in the main process
    text_key: str = "text"  # JSONL field / Parquet column holding the document
    skip_bad_lines: bool = False  # count malformed records instead of failing
    overwrite: bool = False
    verify: str | None = None  # verify=<dir>: check that store in full (checksums, token ids) and exit
    max_bytes: int = 0  # stop reading input after this many bytes (0: no limit)
    batch_bytes: int = 1 << 20  # input bytes per task sent to a worker
    seed: int = 0  # order in which inputs are sampled to train the tokenizer
    progress: bool = True
    # "auto": chat when the first record carries "messages", prompt_completion when it carries
    # "prompt" and "completion", else text. Chat and prompt_completion stores get a loss mask.
    format: str = "auto"  # "auto" | "text" | "chat" | "prompt_completion"
    max_doc_tokens: int = 0  # masked formats: longer documents are dropped and counted (0: no limit)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: LossMaskConfig = field(default_factory=LossMaskConfig)

    def problems(self) -> list[str]:
        """Every invariant this config breaks, as readable lines (empty when valid)."""
        out = []
        if self.input in (None, "", []):
            out.append("input must name a file, a directory, a glob or 'stdlib'")
        if not self.output:
            out.append("output must name the directory to write")
        if self.workers < 0:
            out.append(f"workers must be >= 0, got {self.workers}")
        if self.max_bytes < 0 or self.batch_bytes < 1:
            out.append("max_bytes must be >= 0 and batch_bytes >= 1")
        if self.format not in FORMATS:
            out.append(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.data.train_on not in TRAIN_ON:
            out.append(f"data.train_on must be one of {TRAIN_ON}, got {self.data.train_on!r}")
        if self.format in ("chat", "prompt_completion") and not self.tokenizer.model:
            out.append(f"format={self.format} needs tokenizer.model=<Hugging Face model dir> (the checkpoint's "
                       "tokenizer and chat template)")
        if self.max_doc_tokens < 0:
            out.append(f"max_doc_tokens must be >= 0, got {self.max_doc_tokens}")
        tok = self.tokenizer
        if tok.model is None:
            if tok.type not in TOKENIZER_TYPES:
                out.append(f"tokenizer.type must be one of {TOKENIZER_TYPES}, got {tok.type!r}")
            if tok.max_sentence_bytes < 16:
                out.append(f"tokenizer.max_sentence_bytes must be >= 16, got {tok.max_sentence_bytes}")
            if not 260 <= tok.vocab_size <= (1 << 32) - 1:
                out.append(f"tokenizer.vocab_size must be in [260, 2^32) (byte fallback needs 256 ids), "
                           f"got {tok.vocab_size}")
        return out
