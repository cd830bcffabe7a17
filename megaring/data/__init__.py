"""Data: token store, preprocessing CLI, tokenizers, sample index, sharded readers, mock source.

The trainer uses :class:`DataConfig`, :func:`describe_data`, :func:`build_batch_reader`,
:func:`build_eval_reader` and the pre-flight checks :func:`eval_data_problems` and
:func:`tokenizer_vocab_problems`; checkpoints record :func:`store_identity`; :func:`open_dataset`
opens a preprocessed directory for inspection and :func:`load_tokenizer` a sentencepiece model or
Hugging Face tokenizer.
"""

from megaring.data.checks import eval_data_problems, tokenizer_vocab_problems
from megaring.data.config import DataConfig, PreprocessConfig, TokenizerConfig
from megaring.data.dataset import Dataset, open_dataset, write_tokenized
from megaring.data.eval_reader import EvalReader, build_eval_reader, build_eval_readers
from megaring.data.mock import MockSource
from megaring.data.reader import (
    BatchReader,
    BatchShape,
    DataInfo,
    RankShard,
    build_batch_reader,
    describe_data,
    read_shard,
    store_identity,
)
from megaring.data.store import StoreError
from megaring.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "BatchReader", "BatchShape", "DataConfig", "DataInfo", "Dataset", "EvalReader", "MockSource", "PreprocessConfig",
    "RankShard",
    "StoreError", "Tokenizer", "TokenizerConfig", "TokenizerError", "build_batch_reader", "build_eval_reader",
    "build_eval_readers",
    "describe_data", "eval_data_problems", "load_tokenizer", "open_dataset", "read_shard",
    "store_identity", "tokenizer_vocab_problems", "write_tokenized",
]
