"""Document masks of a planned block, built lazily in query-row tiles (never ``S x S``).

:func:`block_calls` turns a block plan (:mod:`megaring.ring.block_plan`) into kernel calls. Without
segment ids, or when a tile's queries and keys are one document, a call carries no mask. Otherwise
the same-document mask (causality folded in) is built in sub-tiles of query rows under the
``mask_entries`` budget of :class:`~megaring.ring.settings.RingSettings`; sub-tiles that see no
key of their documents are skipped, and when ids are sorted (packed samples) a sub-tile attends
only to the key range of its own documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from megaring.ring.settings import RingSettings

if TYPE_CHECKING:
    from megaring.ring.block_plan import BlockPlan


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``q`` against rows ``kv`` of the key block."""

    q: slice
    kv: slice
    causal: bool  # square diagonal block with a lower-triangular mask
    mask: torch.Tensor | None  # (B, rows of q, rows of kv) bool, True where attention is allowed
    batch: slice = field(default_factory=lambda: slice(None))  # its samples (mask-aware calls: per sample)


def block_calls(plan: BlockPlan | None, seg_q: torch.Tensor | None, seg_k: torch.Tensor | None,
                settings: RingSettings, *, length: int | None = None, kv: slice | None = None,
                q_tiles: list[slice] | None = None) -> Iterator[BlockCall]:
    """The kernel calls that compute ``plan``, made one at a time (lazily, so that only one tile's
    mask exists at once); none when nothing is visible.

    ``kv`` keeps only the plan's key rows inside that range, and ``q_tiles`` (consecutive row
    ranges covering the shard) cuts its queries into tiles. On the causal diagonal a tile's keys
    must lie inside one query tile or before it: the tile then splits into rows that see none of
    them, a causal square and rows that see them all. ``length`` is the local shard length (taken
    from ``seg_q`` when given). Without ``kv`` and ``q_tiles``, the plan is one tile.

    Within a tile, without segment ids or when its queries and keys all belong to one document,
    this is one call without a mask; otherwise see the module docstring. A block of many short
    sorted documents costs about (rows x document length), not (rows x block length).
    """
    if plan is None:
        return
    if kv is None and q_tiles is None:
        yield from _tile_calls(plan.q, plan.kv, plan.causal, seg_q, seg_k, settings, length)
        return
    length = seg_q.shape[1] if length is None else length
    (q0, nq), (k0, nk) = _span(plan.q, length), _span(plan.kv, length)
    if kv is not None:
        c0, nc = _span(kv, length)
        k0, k1 = max(k0, c0), min(k0 + nk, c0 + nc)
        nk = k1 - k0
    if nk <= 0:
        return
    for qt in q_tiles or [slice(0, length)]:
        qs = slice(max(qt.start, q0), min(qt.stop, q0 + nq))
        if qs.start < qs.stop:
            yield from _tile_calls(qs, slice(k0, k0 + nk), plan.causal, seg_q, seg_k, settings, length)


def _tile_calls(qs: slice, ks: slice, causal: bool, seg_q, seg_k, settings: RingSettings,
                length) -> Iterator[BlockCall]:
    """Calls for query rows ``qs`` against key rows ``ks``; ``causal``: key j is visible to query i
    only if j <= i (on the diagonal block, where local order is global order)."""
    if seg_q is None and length is None:  # a whole plan: causal plans are square diagonal blocks
        yield BlockCall(qs, ks, causal, None)
        return
    n = seg_q.shape[1] if seg_q is not None else length
    (q0, nq), (k0, nk) = _span(qs, n), _span(ks, n)
    if causal:
        if k0 > q0 + nq - 1:
            return  # every key after every query
        if k0 + nk - 1 <= q0:
            causal = False  # every key at or before every query
    if seg_q is None or _one_document(seg_q[:, qs], seg_k[:, ks]):
        yield from _unmasked_calls(qs, ks, causal, (q0, nq), (k0, nk))
        return
    yield from _masked_calls(qs, ks, causal, seg_q[:, q0:q0 + nq], seg_k[:, k0:k0 + nk].contiguous(),
                             (q0, nq), (k0, nk), settings)


def _unmasked_calls(qs, ks, causal, q_span, k_span) -> Iterator[BlockCall]:
    (q0, nq), (k0, nk) = q_span, k_span
    if not causal or (q0, nq) == (k0, nk):
        yield BlockCall(qs, ks, causal, None)
        return
    if not q0 <= k0 < k0 + nk <= q0 + nq:
        raise AssertionError(f"keys {ks} cross the bounds of query tile {qs} on the causal diagonal")
    yield BlockCall(ks, ks, True, None)  # rows before k0 see none of these keys
    if k0 + nk < q0 + nq:
        yield BlockCall(slice(k0 + nk, q0 + nq), ks, False, None)  # rows after them see all


def _masked_calls(qs, ks, causal, sq, sk, q_span, k_span, settings: RingSettings) -> Iterator[BlockCall]:
    """Sub-tiles of query rows with their same-document masks; ``sq`` (B, nq), ``sk`` (B, nk)."""
    (q0, nq), (k0, nk) = q_span, k_span
    tile = max(1, min(settings.mask_tile_rows, settings.mask_entries // (sk.shape[0] * nk)))
    sorted_keys = bool((sk[:, 1:] >= sk[:, :-1]).all())  # packed samples: ids grow along the sequence
    for r0 in range(0, nq, tile):
        r1 = min(nq, r0 + tile)
        lo, hi = 0, nk
        if causal:  # query row q0 + r1 - 1 sees keys up to that index
            hi = min(hi, q0 + r1 - k0)
        if sorted_keys:  # only keys of the tile's documents: a document's tokens are contiguous
            ids = sq[:, r0:r1]
            lo = max(lo, int(torch.searchsorted(sk, ids.amin(1, keepdim=True)).min()))
            hi = min(hi, int(torch.searchsorted(sk, ids.amax(1, keepdim=True), right=True).max()))
        if lo >= hi:
            continue
        mask = sq[:, r0:r1, None] == sk[:, None, lo:hi]  # (B, r1 - r0, hi - lo)
        if causal:
            mask &= (torch.arange(k0 + lo, k0 + hi, device=mask.device)
                     <= torch.arange(q0 + r0, q0 + r1, device=mask.device)[:, None])
        if bool(mask.any()):
            whole = r0 == 0 and r1 == nq and lo == 0 and hi == nk  # one tile: keep the given slices
            yield BlockCall(qs if whole else slice(q0 + r0, q0 + r1), ks if whole else slice(k0 + lo, k0 + hi),
                            False, mask)


def _one_document(sq: torch.Tensor, sk: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(torch.cat([sq.flatten(), sk.flatten()]))
    return bool(lo == hi)


def _span(rows: slice, length: int) -> tuple[int, int]:
    start, stop, _ = rows.indices(length)
    return start, stop - start
