"""Which heads each Ulysses rank gets: query heads split evenly, K/V heads split or replicated.

With ``H`` query heads and ``H_kv`` kv heads on this tp rank (``g = H / H_kv`` queries per kv
head) and a Ulysses group of ``U``, rank u gets query heads ``[u H/U, (u+1) H/U)``. Their kv heads:

- ``H_kv % U == 0``: kv heads ``[u H_kv/U, (u+1) H_kv/U)``, a plain split (GQA ratio kept);
- ``U % H_kv == 0``: exactly one kv head, ``u // (U / H_kv)``: each kv head is sent to the
  ``U / H_kv`` ranks whose queries use it, never expanded to all ``H`` query heads;
- otherwise a rank's query heads would straddle kv heads unevenly: refused.
"""

from __future__ import annotations

import torch


def head_problems(n_heads: int, n_kv_heads: int, ulysses: int, *, where: str = "") -> list[str]:
    """Every reason ``ulysses`` cannot split these (per-tp-rank) heads; ``where`` names their origin."""
    out = []
    if n_heads % ulysses:
        out.append(f"{where or 'the'} query heads ({n_heads}) are not divisible by parallel.ulysses={ulysses}")
    if n_kv_heads % ulysses and ulysses % n_kv_heads:
        out.append(f"{where or 'the'} kv heads ({n_kv_heads}) must be a multiple or a divisor of "
                   f"parallel.ulysses={ulysses} (split, or replicated to the ranks whose queries use them)")
    return out


def kv_send_index(n_kv_heads: int, ulysses: int) -> torch.Tensor | None:
    """kv head indices in send order (U equal groups, one per destination); None: all, unchanged."""
    if n_kv_heads % ulysses == 0:
        return None
    return torch.arange(n_kv_heads).repeat_interleave(ulysses // n_kv_heads)


def kv_heads_per_rank(n_kv_heads: int, ulysses: int) -> int:
    """kv heads a rank holds after the all-to-all."""
    return n_kv_heads // ulysses if n_kv_heads % ulysses == 0 else 1
