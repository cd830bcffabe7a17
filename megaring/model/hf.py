"""Moved to :mod:`megaring.hf.names` (kept so that ``megaring.model.hf`` imports keep working)."""

from megaring.hf.names import hf_llama_config_kwargs, to_hf_llama_state_dict, to_hf_state_dict

__all__ = ["hf_llama_config_kwargs", "to_hf_llama_state_dict", "to_hf_state_dict"]
