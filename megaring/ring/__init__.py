"""Ring attention: layouts, P2P ring, softmax merge and the autograd function."""

from megaring.ring.attention import ring_attention
from megaring.ring.layout import shard_positions, shard_ranges, shard_sequence, unshard_sequence

__all__ = ["ring_attention", "shard_positions", "shard_ranges", "shard_sequence", "unshard_sequence"]
