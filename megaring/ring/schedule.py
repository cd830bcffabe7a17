"""Which part of each (query shard, key shard) pair a rank computes at each ring step.

At step s, rank r holds the keys of rank j = (r - s) mod W. With a causal mask:

- contiguous layout: j < r all visible; j == r the causal diagonal; j > r nothing.
- zigzag layout (rank r holds chunks r and 2W-1-r, each of c tokens):
  j == r: the local causal block (local order follows global order);
  j < r:  every query sees the first key chunk (chunk j), none sees chunk 2W-1-j;
  j > r:  only the second query chunk (2W-1-r) sees the keys, and it sees all of them.
  Each of these costs 2c*c query-key pairs (the diagonal skips its masked half), so
  every rank does the same work at every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockPlan:
    q: slice  # local query rows to compute
    kv: slice  # rows of the key/value block they attend to
    causal: bool  # square diagonal block with a lower-triangular mask


ALL = slice(None)


def plan_block(rank: int, src: int, size: int, local_len: int, *, causal: bool, layout: str) -> BlockPlan | None:
    """The block rank ``rank`` computes against keys of rank ``src``; None if fully masked."""
    if not causal:
        return BlockPlan(ALL, ALL, False)
    if src == rank:
        return BlockPlan(ALL, ALL, True)
    if layout == "contiguous":
        return BlockPlan(ALL, ALL, False) if src < rank else None
    half = local_len // 2
    if src < rank:
        return BlockPlan(ALL, slice(0, half), False)
    return BlockPlan(slice(half, None), ALL, False)


# At most this many (batch x query x key) mask entries exist at once: 2^25 is 32 MiB of booleans
# plus 128 MiB for a kernel's float copy. Blocks with documents are cut into query-row tiles below it.
MASK_ENTRIES = 1 << 25
# Query rows per tile at most: short tiles span few documents, so their key ranges stay short.
MASK_TILE_ROWS = 512


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``q`` against rows ``kv`` of the key block."""

    q: slice
    kv: slice
    causal: bool  # square diagonal block with a lower-triangular mask
    mask: torch.Tensor | None  # (B, rows of q, rows of kv) bool, True where attention is allowed


def block_calls(plan: BlockPlan | None, seg_q: torch.Tensor | None, seg_k: torch.Tensor | None,
                max_mask_entries: int | None = None) -> Iterator[BlockCall]:
    """The kernel calls that compute ``plan`` with document masking, made one at a time (lazily,
    so that only one tile's mask exists at once); none when nothing is visible.

    Without segment ids, or when the block's queries and keys all belong to one document, this is
    one call without a mask. Otherwise the same-document mask (with causality folded in on the
    diagonal) is built tile by tile of query rows, so it never exceeds ``max_mask_entries``
    whatever the block length (default :data:`MASK_ENTRIES`), and tiles that see no key of their
    documents are skipped. When the keys' ids are sorted (packed samples, in either layout), a tile
    attends only to the key range of its own documents, so a block of many short documents costs
    about (rows x document length), not (rows x block length).
    """
    if plan is None:
        return
    if seg_q is None or _one_document(seg_q[:, plan.q], seg_k[:, plan.kv]):
        yield BlockCall(plan.q, plan.kv, plan.causal, None)
        return
    sq, sk = seg_q[:, plan.q], seg_k[:, plan.kv]  # (B, nq), (B, nk)
    (q0, nq), (k0, nk) = _span(plan.q, seg_q.shape[1]), _span(plan.kv, seg_k.shape[1])
    rows = max(1, min(MASK_TILE_ROWS, (max_mask_entries or MASK_ENTRIES) // (sk.shape[0] * nk)))
    sorted_keys = bool((sk[:, 1:] >= sk[:, :-1]).all())  # packed samples: ids grow along the sequence
    sk = sk.contiguous()
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        lo, hi = 0, r1 if plan.causal else nk  # on the diagonal, rows < r1 see keys < r1 only
        if sorted_keys:  # only keys of the tile's documents: a document's tokens are contiguous
            tile = sq[:, r0:r1]
            lo = max(lo, int(torch.searchsorted(sk, tile.amin(1, keepdim=True)).min()))
            hi = min(hi, int(torch.searchsorted(sk, tile.amax(1, keepdim=True), right=True).max()))
            if lo >= hi:
                continue
        mask = sq[:, r0:r1, None] == sk[:, None, lo:hi]  # (B, r1 - r0, hi - lo)
        if plan.causal:
            mask &= torch.arange(lo, hi, device=mask.device) <= torch.arange(r0, r1, device=mask.device)[:, None]
        if bool(mask.any()):
            whole = r0 == 0 and r1 == nq and lo == 0 and hi == nk  # one tile: keep the plan's slices
            yield BlockCall(plan.q if whole else slice(q0 + r0, q0 + r1), plan.kv if whole else slice(k0 + lo, k0 + hi),
                            False, mask)


def _one_document(sq: torch.Tensor, sk: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(torch.cat([sq.flatten(), sk.flatten()]))
    return bool(lo == hi)


def _span(rows: slice, length: int) -> tuple[int, int]:
    start, stop, _ = rows.indices(length)
    return start, stop - start
