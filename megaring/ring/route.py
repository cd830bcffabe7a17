"""Which K/V rows each rank's queries can see, and the route every K/V block takes around the ring.

The mask comes from the tokens, not from the layout: token ``(b, seg, pos)`` (sample, document,
position inside the document) of a query sees key ``(b', seg', pos')`` iff ``b == b'``,
``seg == seg'``, ``pos' <= pos`` (causal) and, with a window ``W``, ``pos - pos' < W``. Any layout
is then exact, including the balanced one (:func:`megaring.layout.balanced_ranges`).

A rank's tokens compress into *runs*: maximal stretches of local rows of one sample and one
document with consecutive positions (one per document piece under the balanced layout). Before
the ring starts, ranks all-gather their runs once (two small collectives: the counts, then the
runs), and from them every rank computes the same :class:`Route`:

- ``visible[j]``: the bounding query rows of this rank and key rows of rank j's block that see
  each other (``None``: nothing visible, the step is skipped forward and backward);
- ``last[j]``: the farthest hop (``t`` ranks after j) whose rank sees any key of block j; the block
  travels hops ``1 .. last[j]`` and no further (0: it never leaves its rank);
- ``carry[j][t]``: the rows of block j that travel at hop t, the bounding rows still needed at
  hops ``>= t`` (they shrink, so a rank sends a slice of what it holds).

All of it is pure arithmetic on the gathered runs apart from :func:`gather_runs`. A
:class:`RouteCache` keeps the last route, so the layers of one forward (and its recomputations)
gather and build it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaring.distributed.mesh import Axis

# Columns of a runs tensor (n, 6) int64: sample, document, first and last position, rows [row0, row1).
B, SEG, P0, P1, ROW0, ROW1 = range(6)
NO_WINDOW = 1 << 62


def local_runs(seg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Runs of a rank's tokens: ``seg``, ``pos`` (B, S_local) int64 -> (n, 6) int64, sample-major."""
    b, s = seg.shape
    new = torch.ones(b, s, dtype=torch.bool, device=seg.device)  # (B, S) a run starts here
    new[:, 1:] = (seg[:, 1:] != seg[:, :-1]) | (pos[:, 1:] != pos[:, :-1] + 1)
    flat = torch.nonzero(new.reshape(-1)).reshape(-1)  # (n,) flat index of each run's first token
    ends = torch.cat([flat[1:], flat.new_tensor([b * s])])  # every sample has a run at row 0
    bi, row0 = flat // s, flat % s
    row1 = ends - bi * s
    p0 = pos.reshape(-1)[flat]
    return torch.stack([bi, seg.reshape(-1)[flat], p0, p0 + row1 - row0 - 1, row0, row1], dim=1).cpu()


def gather_runs(axis: Axis, runs: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's runs (a list indexed by axis rank): two all-gathers over ``axis``."""
    if axis.size == 1:
        return [runs]
    device = torch.device("cpu") if dist.get_backend(axis.group) == "gloo" else torch.device("cuda")
    count = torch.tensor([runs.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(axis.size)]
    dist.all_gather(counts, count, group=axis.group)
    most = int(max(int(c) for c in counts))
    padded = torch.zeros(most, 6, dtype=torch.int64, device=device)
    padded[:runs.shape[0]] = runs.to(device)
    out = [torch.empty_like(padded) for _ in range(axis.size)]
    dist.all_gather(out, padded, group=axis.group)
    return [o[:int(c)].cpu() for o, c in zip(out, counts)]


@dataclass(frozen=True)
class Rows:
    """Bounding rows a (query rank, key block) pair needs: query rows ``q``, key rows ``k``."""

    q: tuple[int, int]
    k: tuple[int, int]


def pair_rows(q_runs: torch.Tensor, k_runs: torch.Tensor, causal: bool, window: int | None) -> Rows | None:
    """Bounding query rows and key rows of the query-key pairs of two ranks that see each other."""
    if q_runs.numel() == 0 or k_runs.numel() == 0:
        return None
    w = NO_WINDOW if window is None else window
    q, k = q_runs[:, None, :], k_runs[None, :, :]  # (nq, 1, 6), (1, nk, 6)
    same = (q[..., B] == k[..., B]) & (q[..., SEG] == k[..., SEG])  # (nq, nk)
    # visible key positions of run k from run q, and query positions of run q that see run k
    k_lo = torch.maximum(k[..., P0], q[..., P0] - w + 1)
    k_hi = torch.minimum(k[..., P1], q[..., P1] if causal else q[..., P1] + w - 1)
    q_lo = torch.maximum(q[..., P0], k[..., P0] if causal else k[..., P0] - w + 1)
    q_hi = torch.minimum(q[..., P1], k[..., P1] + w - 1)
    seen = same & (k_lo <= k_hi) & (q_lo <= q_hi)
    if not bool(seen.any()):
        return None
    k_rows0 = (k[..., ROW0] + k_lo - k[..., P0])[seen]
    k_rows1 = (k[..., ROW0] + k_hi - k[..., P0] + 1)[seen]
    q_rows0 = (q[..., ROW0] + q_lo - q[..., P0])[seen]
    q_rows1 = (q[..., ROW0] + q_hi - q[..., P0] + 1)[seen]
    return Rows((int(q_rows0.min()), int(q_rows1.max())), (int(k_rows0.min()), int(k_rows1.max())))


@dataclass(frozen=True)
class Route:
    """One rank's view of the mask-aware ring (see the module docstring); same on every rank."""

    rank: int
    size: int
    local_len: int
    runs: tuple[torch.Tensor, ...]  # every rank's runs
    visible: tuple[Rows | None, ...]  # this rank's queries against block j
    last: tuple[int, ...]  # per block j: the farthest hop it travels
    carry: tuple[tuple[tuple[int, int], ...], ...]  # per block j, per hop t <= last[j]: rows held

    @property
    def steps(self) -> int:
        """Ring steps anyone computes or sends in: the rest of the ring is skipped."""
        return 1 + max(self.last)

    def src(self, step: int) -> int:
        """The block this rank holds at ``step``."""
        return (self.rank - step) % self.size

    def holds(self, step: int) -> bool:
        j = self.src(step)
        return step <= self.last[j]

    def sends(self, step: int) -> tuple[int, int] | None:
        """Rows of the held block this rank sends to the next one at ``step`` (None: nothing)."""
        j = self.src(step)
        return self.carry[j][step + 1] if step + 1 <= self.last[j] else None

    def receives(self, step: int) -> tuple[int, int] | None:
        """Rows of the block arriving from the previous rank for ``step + 1`` (None: nothing)."""
        j = self.src(step + 1)
        return self.carry[j][step + 1] if step + 1 <= self.last[j] else None

    def key_meta(self, j: int, rows: tuple[int, int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seg, pos)`` (B, rows) int64 of rank j's key rows ``rows``, rebuilt from its runs."""
        seg = torch.empty(batch, self.local_len, dtype=torch.int64)
        pos = torch.empty(batch, self.local_len, dtype=torch.int64)
        for b, s, p0, _, r0, r1 in self.runs[j].tolist():
            seg[b, r0:r1] = s
            pos[b, r0:r1] = torch.arange(p0, p0 + r1 - r0)
        return seg[:, rows[0]:rows[1]], pos[:, rows[0]:rows[1]]


def build_route(runs: list[torch.Tensor], rank: int, local_len: int, causal: bool, window: int | None) -> Route:
    """The :class:`Route` of ``rank`` from every rank's runs (pure: all ranks compute the same)."""
    w = len(runs)
    visible = tuple(pair_rows(runs[rank], runs[j], causal, window) for j in range(w))
    last, carry = [], []
    for j in range(w):
        needs = [pair_rows(runs[(j + t) % w], runs[j], causal, window) for t in range(1, w)]
        hops = [t for t, n in enumerate(needs, start=1) if n is not None]
        far = max(hops, default=0)
        held = [(0, local_len)]
        for t in range(1, far + 1):  # rows needed at hops >= t: a bounding range that shrinks
            later = [needs[u - 1].k for u in range(t, far + 1) if needs[u - 1] is not None]
            held.append((min(a for a, _ in later), max(b for _, b in later)))
        last.append(far)
        carry.append(tuple(held))
    return Route(rank, w, local_len, tuple(runs), visible, tuple(last), tuple(carry))


class RouteCache:
    """The last mask-aware ring setup, reused while the same token tensors come back.

    Every layer of a forward gets the same ``segment_ids`` / ``positions`` tensors, so its route
    is the same: the key is those tensors' identity and version counter (an in-place change
    misses) plus everything else the route depends on. The cache holds the tensors, so their
    identity cannot be reused by new ones while cached. Every rank must hit or miss together (a
    miss all-gathers): true when every rank runs the same program on its own shard, as the
    model does; a caller that rebuilds the id tensors per layer just misses every time.
    """

    def __init__(self):
        self._tensors: tuple = ()
        self._key: tuple | None = None
        self._value = None

    def get(self, tensors: tuple, key: tuple, build):
        """``build()``'s result for these ``tensors`` (compared by identity and version) and ``key``."""
        versions = tuple(None if t is None else t._version for t in tensors)
        full = (versions, key)
        if (self._key == full and len(tensors) == len(self._tensors)
                and all(a is b for a, b in zip(tensors, self._tensors))):
            return self._value
        self._value = build()
        self._tensors, self._key = tensors, full
        return self._value
