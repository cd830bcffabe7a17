"""Data: token store, preprocessing CLI, sample index, sharded reader, mock source.

The trainer uses :class:`DataConfig`, :func:`describe_data` and :func:`build_batch_reader`;
:func:`open_dataset` opens a preprocessed directory for inspection.
"""

from megaring.data.config import DataConfig, PreprocessConfig, TokenizerConfig
from megaring.data.dataset import Dataset, open_dataset, write_tokenized
from megaring.data.mock import MockSource
from megaring.data.reader import BatchReader, DataInfo, build_batch_reader, describe_data, read_shard
from megaring.data.store import StoreError

__all__ = [
    "BatchReader", "DataConfig", "DataInfo", "Dataset", "MockSource", "PreprocessConfig", "StoreError",
    "TokenizerConfig", "build_batch_reader", "describe_data", "open_dataset", "read_shard", "write_tokenized",
]
