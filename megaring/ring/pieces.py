"""The mask-aware ring's kernel calls, cut at document boundaries: whole pieces run unmasked.

A rank's queries and a held K/V block are both made of *runs* (:mod:`megaring.ring.route`: rows
of one sample and one document with consecutive positions; under the balanced layout, one per
document or document piece). A query run Q at positions ``[a, b]`` only sees key runs K
``[c, d]`` of its own document, and their visible pairs form at most three boxes, none of which
needs a mask (causal, no window)::

    queries a..b      x keys c..min(d, a-1)   every key before every query: one plain call
    queries x..y      x keys x..y             x = max(a, c), y = min(b, d): a causal square
    queries y+1..b    x keys x..y             every key before every query: one plain call

A window ``W`` cuts Q into tiles of ``t <= W`` rows (at most ``mask_tile_rows``); in a tile
``[p, p+t)`` the keys ``[p+t-W, ...]`` are inside the window for every query, so the boxes above
apply to them, and only the window's edge (keys ``p-W+1 .. p+t-1-W``, a ``t x t`` box) carries a
mask. Without ``causal`` the window has two such edges and the middle is one plain call.

Tiny documents would make tiny calls: a query run shorter than ``piece_rows`` whose visible key
runs are all short too is gathered with its neighbours into masked tiles of up to
``mask_tile_rows`` rows against the bounding key rows of what they see (the mask, built from the
tokens' documents and positions, is exact whatever the box holds). Every query row is computed by
exactly one of the two, so the calls partition the visible pairs. Pure arithmetic on run lists.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from megaring.ring.route import NO_WINDOW
from megaring.ring.settings import RingSettings

ALL = slice(None)


@dataclass(frozen=True)
class Box:
    """A kernel call before its mask exists: ``batch`` samples, query rows ``q`` against rows
    ``kv`` of the held block; ``masked``: its mask must be built from the tokens' metadata."""

    batch: slice
    q: slice
    kv: slice
    causal: bool
    masked: bool


@dataclass(frozen=True)
class Run:
    seg: int
    p0: int  # first position (inclusive)
    p1: int  # last position (inclusive)
    row0: int

    def rows(self, a: int, b: int) -> slice:
        """Rows of positions ``a..b`` (inclusive)."""
        return slice(self.row0 + a - self.p0, self.row0 + b - self.p0 + 1)


def block_boxes(q_runs: torch.Tensor, k_runs: torch.Tensor, held: tuple[int, int], batch: int, causal: bool,
                window: int | None, settings: RingSettings) -> list[Box]:
    """The calls of this rank's queries (runs ``q_runs``) against rows ``held`` of a block whose
    owner's runs are ``k_runs`` (both (n, 6) as in :mod:`megaring.ring.route`); ``kv`` slices
    index the held rows. One set of calls for every sample when all samples have the same runs."""
    q_by, k_by = _per_sample(q_runs.tolist(), batch), _per_sample(_clip(k_runs.tolist(), held), batch)
    if batch > 1 and all(q_by[b] == q_by[0] and k_by[b] == k_by[0] for b in range(batch)):
        return _sample_boxes(q_by[0], k_by[0], ALL, causal, window, settings)
    boxes = []
    for b in range(batch):
        boxes += _sample_boxes(q_by[b], k_by[b], slice(b, b + 1), causal, window, settings)
    return boxes


def _clip(runs: list, held: tuple[int, int]) -> list:
    """Runs cut to the held rows, their rows counted from the first held row."""
    out = []
    for b, s, p0, _, r0, r1 in runs:
        a, z = max(r0, held[0]), min(r1, held[1])
        if a < z:
            out.append((b, s, p0 + a - r0, p0 + z - 1 - r0, a - held[0], z - held[0]))
    return out


def _per_sample(runs: list, batch: int) -> list[list[Run]]:
    by: list[list[Run]] = [[] for _ in range(batch)]
    for b, s, p0, p1, r0, _ in runs:
        by[b].append(Run(s, p0, p1, r0))
    return by


def _sample_boxes(q_runs: list[Run], k_runs: list[Run], batch: slice, causal: bool, window: int | None,
                  settings: RingSettings) -> list[Box]:
    keys = defaultdict(list)
    for k in k_runs:
        keys[k.seg].append(k)
    boxes: list[Box] = []
    group: list[tuple[slice, slice]] = []  # short query runs waiting for a masked tile
    for q in q_runs:
        pairs = [(q_rows, k.rows(c, d), kind) for k in keys[q.seg]
                 for (a, b, c, d, kind) in pair_boxes(q, k, causal, window, settings)
                 for q_rows in [q.rows(a, b)]]
        if not pairs:
            continue
        short = q.p1 - q.p0 + 1 < settings.piece_rows and all(
            kv.stop - kv.start < settings.piece_rows for _, kv, _ in pairs)
        if short:
            span = (min(p[0].start for p in pairs), max(p[0].stop for p in pairs),
                    min(p[1].start for p in pairs), max(p[1].stop for p in pairs))
            if group and _too_wide(group, span, settings.mask_tile_rows):
                boxes.append(_group_box(group, batch))
                group = []
            group.append((slice(span[0], span[1]), slice(span[2], span[3])))
            continue
        if group:  # the group's box must not cover the rows of this run
            boxes.append(_group_box(group, batch))
            group = []
        for q_rows, kv, kind in pairs:
            _append(boxes, Box(batch, q_rows, kv, kind == CAUSAL, kind == MASK))
    if group:
        boxes.append(_group_box(group, batch))
    return boxes


def _append(boxes: list[Box], box: Box) -> None:
    """Add ``box``, joined to the previous one when both are plain and share their query rows
    with adjacent keys, or their keys with adjacent query rows (fewer, larger kernel calls)."""
    last = boxes[-1] if boxes else None
    if last is None or last.causal or last.masked or box.causal or box.masked or last.batch != box.batch:
        boxes.append(box)
    elif last.q == box.q and last.kv.stop == box.kv.start:
        boxes[-1] = Box(box.batch, box.q, slice(last.kv.start, box.kv.stop), False, False)
    elif last.kv == box.kv and last.q.stop == box.q.start:
        boxes[-1] = Box(box.batch, slice(last.q.start, box.q.stop), box.kv, False, False)
    else:
        boxes.append(box)


def _too_wide(group: list[tuple[slice, slice]], span: tuple[int, int, int, int], tile: int) -> bool:
    """Whether adding a run's ``span`` would take the group past ``tile`` query rows or twice as
    many key rows."""
    q0, k0 = min(q.start for q, _ in group), min(k.start for _, k in group)
    k1 = max(k.stop for _, k in group)
    return span[1] - q0 > tile or max(k1, span[3]) - min(k0, span[2]) > 2 * tile


def _group_box(group: list[tuple[slice, slice]], batch: slice) -> Box:
    q0, q1 = min(q.start for q, _ in group), max(q.stop for q, _ in group)
    k0, k1 = min(k.start for _, k in group), max(k.stop for _, k in group)
    return Box(batch, slice(q0, q1), slice(k0, k1), False, True)


FULL, CAUSAL, MASK = "full", "causal", "mask"


def pair_boxes(q: Run, k: Run, causal: bool, window: int | None, settings: RingSettings):
    """Position boxes ``(a, b, c, d, kind)`` (queries ``a..b`` x keys ``c..d``, inclusive) that
    hold exactly the visible pairs of query run ``q`` and key run ``k`` of one document."""
    w = NO_WINDOW if window is None else window
    reach = max(q.p1 - k.p0, 0 if causal else k.p1 - q.p0)  # the farthest visible |p - p'|
    if w > reach:
        yield from _plain_boxes(q.p0, q.p1, k.p0, k.p1, causal)  # the window never cuts this pair
        return
    small = w < settings.piece_rows  # tiny windows: masked tiles, not tiny calls
    t = settings.mask_tile_rows if small else min(settings.mask_tile_rows, w)
    for a in range(q.p0, q.p1 + 1, t):
        b = min(q.p1, a + t - 1)
        lo, hi = max(k.p0, a - w + 1), min(k.p1, b if causal else b + w - 1)
        if lo > hi:
            continue
        if small:
            yield a, b, lo, hi, MASK
            continue
        inner_lo, inner_hi = max(lo, b - w + 1), min(hi, b if causal else a + w - 1)
        if lo < inner_lo:
            yield a, b, lo, min(hi, inner_lo - 1), MASK  # the window's lower edge
        if inner_lo <= inner_hi:
            yield from _plain_boxes(a, b, inner_lo, inner_hi, causal)
        if inner_hi < hi:
            yield a, b, max(lo, inner_hi + 1), hi, MASK  # the upper edge (no causal mask)


def _plain_boxes(a: int, b: int, c: int, d: int, causal: bool):
    """Queries ``a..b`` x keys ``c..d`` of one document, the window not cutting: <= 3 plain boxes."""
    if not causal:
        yield a, b, c, d, FULL
        return
    if c > b:
        return  # every key after every query
    x, y = max(a, c), min(b, d)
    if x > y:  # every key before every query
        yield a, b, c, d, FULL
        return
    if c < x:
        yield a, b, c, x - 1, FULL
    yield x, y, x, y, CAUSAL
    if y < b:
        yield y + 1, b, x, y, FULL
