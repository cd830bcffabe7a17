"""Llama-style transformer, tensor-parallel over tp and ring-parallel over cp (see docs/architecture.md)."""

from megaring.model.config import ModelConfig, check_model_config, padded_vocab_size, validate_model_config
from megaring.model.context import ParallelContext
from megaring.model.flops import model_flops_per_token, num_params
from megaring.model.loss import count_valid_tokens, local_loss
from megaring.model.state_dict import gather_full_grads, gather_full_state_dict, load_full_state_dict
from megaring.model.transformer import Transformer, build_model
from megaring.tensor_parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "ModelConfig",
    "ParallelContext",
    "Transformer",
    "build_model",
    "check_model_config",
    "count_valid_tokens",
    "gather_full_grads",
    "gather_full_state_dict",
    "load_full_state_dict",
    "local_loss",
    "model_flops_per_token",
    "num_params",
    "padded_vocab_size",
    "validate_model_config",
    "vocab_parallel_cross_entropy",
]
