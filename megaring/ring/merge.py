"""Online-softmax merge of partial attention results, in float32.

For two disjoint key sets A and B with partial outputs ``o_A, o_B`` (each normalised over its
own keys) and log-sum-exps ``l_A, l_B``, attention over A u B is

    l   = log(exp(l_A) + exp(l_B))
    o   = exp(l_A - l) * o_A + exp(l_B - l) * o_B

A row that saw no key of a set carries ``l = -inf`` and weight 0; a row that has seen no key
at all keeps ``l = -inf`` and ``o = 0``. A NaN (or +inf) in either lse makes the row NaN: bad
input propagates to every output that attends to it.
"""

from __future__ import annotations

import torch


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge a block result into the running accumulators, in place.

    out: (B, S, H, D) float32 accumulator; lse: (B, H, S) float32 accumulator (views allowed);
    block_out: (B, S, H, D) any float dtype; block_lse: (B, H, S) float32.
    """
    new_lse = torch.logaddexp(lse, block_lse)  # (B, H, S); -inf only if both are -inf
    seen = new_lse != float("-inf")  # NaN counts as seen: it poisons the row (never a silent zero)
    safe = torch.where(seen, new_lse, torch.zeros_like(new_lse))
    w_old = torch.where(seen, torch.exp(lse - safe), torch.zeros_like(safe))  # (B, H, S)
    w_new = torch.where(seen, torch.exp(block_lse - safe), torch.zeros_like(safe))
    # (B, H, S) -> (B, S, H, 1) weights; in place, so no (B, S, H, D) temporary is made
    out.mul_(w_old.transpose(1, 2).unsqueeze(-1)).addcmul_(block_out, w_new.transpose(1, 2).unsqueeze(-1))
    lse.copy_(new_lse)
