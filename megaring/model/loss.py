"""The training loss: mean token loss over the valid tokens of the global batch.

Each rank holds some tokens of the global batch (its cp shard of its dp micro-batches). With
``count`` the number of valid tokens over the whole batch (all-reduced over ``dp_cp``, and over
the step's micro-batches), rank-local ``loss = sum(local token losses) / count``; the sum of the
local losses over ``dp_cp`` is the global mean, and summing (not averaging) the gradients over
``dp_cp`` gives its gradient. A rank without valid tokens contributes exactly 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis
from megaring.tensor_parallel.cross_entropy import IGNORE_INDEX


def count_valid_tokens(labels: torch.Tensor, axis: Axis | None = None) -> torch.Tensor:
    """Number of labels that are not ``IGNORE_INDEX``, summed over ``axis`` (e.g. ``dp_cp``)."""
    count = (labels != IGNORE_INDEX).sum().to(torch.float32)
    if axis is not None and axis.size > 1:
        dist.all_reduce(count, group=axis.group)
    return count


def local_loss(token_losses: torch.Tensor, global_count: torch.Tensor | float) -> torch.Tensor:
    """``sum(token_losses) / global_count`` (0, not NaN, when there is no valid token anywhere)."""
    if not torch.is_tensor(global_count):
        global_count = torch.tensor(float(global_count))
    return token_losses.sum() / global_count.clamp(min=1.0)
