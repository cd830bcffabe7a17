"""Hugging Face checkpoints in and out: the one owner of the transformers / safetensors boundary.

- ``config``: ``config.json`` <-> :class:`~megaring.model.config.ModelConfig` (Llama, Mistral, Qwen2).
- ``names``: megaring parameter names <-> Hugging Face tensor names (fused projections split).
- ``weights``: safetensors (single or sharded) into a (cp, tp) model, each tp rank reading its slices.
- ``export``: a full state dict to a ``save_pretrained``-style directory.
- ``build``: ``build_model_from_hf`` = config + model + weights.
"""

from megaring.hf.build import build_model_from_hf, hf_model_config
from megaring.hf.config import hf_config_dict, model_config_from_hf, override_problems
from megaring.hf.export import write_hf_checkpoint
from megaring.hf.names import hf_llama_config_kwargs, to_hf_llama_state_dict, to_hf_state_dict
from megaring.hf.weights import CheckpointError, LoadReport, checkpoint_problems, load_hf_weights

__all__ = [
    "CheckpointError",
    "LoadReport",
    "build_model_from_hf",
    "checkpoint_problems",
    "hf_config_dict",
    "hf_llama_config_kwargs",
    "hf_model_config",
    "load_hf_weights",
    "model_config_from_hf",
    "override_problems",
    "to_hf_llama_state_dict",
    "to_hf_state_dict",
    "write_hf_checkpoint",
]
