"""Head-parallel context parallelism (DeepSpeed-Ulysses) and the 2D hybrid with the ring:
all-to-all (comm), head assignment (heads), ``context_attention`` (attention)."""

from megaring.ulysses.attention import context_attention
from megaring.ulysses.heads import head_problems

__all__ = ["context_attention", "head_problems"]
