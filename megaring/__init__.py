"""megaring: sequence-parallel LLM training (ring attention x ZeRO x tensor parallelism)."""

from megaring.ring import ring_attention, shard_sequence, unshard_sequence

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]
__version__ = "0.1.0"
