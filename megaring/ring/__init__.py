"""Ring attention: the block plan, document masks, P2P ring, softmax merge, backward streams and
the autograd function. The sequence layouts live in :mod:`megaring.layout`."""

from megaring.layout import shard_positions, shard_ranges, shard_sequence, unshard_sequence
from megaring.ring.attention import ring_attention
from megaring.ring.settings import RingSettings

__all__ = ["RingSettings", "ring_attention", "shard_positions", "shard_ranges", "shard_sequence",
           "unshard_sequence"]
