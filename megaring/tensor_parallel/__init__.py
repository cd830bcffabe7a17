"""Megatron-style tensor parallelism with explicit tp axes: regions, layers, vocab-parallel loss."""

from megaring.tensor_parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from megaring.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mask_padded_vocab,
    parallel_lm_logits,
    vocab_partition,
)
from megaring.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megaring.tensor_parallel.utils import Partition, divide

__all__ = [
    "IGNORE_INDEX",
    "ColumnParallelLinear",
    "Partition",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tensor_model_parallel_region",
    "divide",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "mask_padded_vocab",
    "parallel_lm_logits",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "vocab_parallel_cross_entropy",
    "vocab_partition",
]
