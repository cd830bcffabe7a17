"""Which dp rank and micro-batch takes which sample of a step: ``data.balance`` (none | work).

The global batch of step ``s`` is always the same set of ``G`` sample ordinals,
``[s*G, (s+1)*G)`` (so the data order stays independent of the mesh and resumable). ``none``
deals them out in order: dp rank ``r`` takes ``G/dp`` consecutive ordinals, cut into
micro-batches. ``work`` evens out the attention work instead:

- the *cost* of a sample is its visible causal query-key pairs: a document piece of ``n``
  tokens costs ``sum_{p<n} min(p + 1, W)`` (``n (n + 1) / 2`` without a window ``W``), and a
  sample the sum over its pieces (with ``data.reset_positions=false`` positions run over the
  sample, which is then one piece). This is the count of ``attn_imbalance`` over cp;
- longest-processing-time first with a fixed count per rank: samples in decreasing cost (ties:
  lower ordinal first) each go to the dp rank with the least work so far that still has room
  (ties: lower rank), so every rank keeps ``G/dp`` samples;
- should the in-order sets be more even than LPT's (LPT is a heuristic: a lucky order can beat
  it), the ranks keep their in-order sets, so ``work`` is never less even than ``none``;
- inside a rank, samples in decreasing cost fill micro-batch 0, then 1, ...: micro-batch ``i``
  of every rank holds samples of similar cost, so the ranks (which meet at every micro-batch's
  gradient reduction) wait little for each other at each one.

The plan depends only on the costs, i.e. on (seed, step, G, dp, micro-batch size) through the
sample order, and is computed identically on every rank without communication. The loss is
unchanged up to summation order: it is the sum over the global batch's tokens over their count
(:mod:`megaring.train.step`). ``work_dp_imbalance`` is the max over dp ranks of a step's cost
over the mean (1.0 is perfect), known on every rank from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BALANCE = ("none", "work")


def piece_pairs(lengths: np.ndarray, window: int | None) -> np.ndarray:
    """Visible causal pairs of document pieces of ``lengths`` tokens (int64, same shape)."""
    n = np.asarray(lengths, dtype=np.int64)
    full = n * (n + 1) // 2
    if window is None:
        return full
    w = np.int64(window)
    return np.where(n <= w, full, w * (w + 1) // 2 + (n - w) * w)


def sample_cost(pieces, window: int | None) -> int:
    """Visible causal pairs of a sample whose document pieces have ``pieces`` tokens
    (:func:`megaring.data.reader.sample_doc_lengths`; one piece of ``seq_len`` when positions run
    over the whole sample)."""
    return int(piece_pairs(np.asarray(pieces, dtype=np.int64), window).sum())


@dataclass(frozen=True)
class StepPlan:
    """Who reads what in one step: ``slots[r, i, j]`` is the index (into the step's ``G`` ordinals)
    of micro-batch ``i``'s ``j``-th sample on dp rank ``r``; ``costs`` those samples' costs."""

    slots: np.ndarray  # (dp, micro_batches, micro_batch_size) int64
    costs: np.ndarray  # (G,) int64

    @property
    def rank_work(self) -> np.ndarray:
        """(dp,) cost each dp rank carries this step."""
        return self.costs[self.slots].reshape(self.slots.shape[0], -1).sum(axis=1)

    @property
    def dp_imbalance(self) -> float:
        """Max over dp ranks of the step's cost over the mean (1.0 is perfect)."""
        work = self.rank_work
        mean = work.mean()
        return float(work.max() / mean) if mean > 0 else 1.0


def in_order(costs: np.ndarray, dp: int, micro_batch_size: int) -> StepPlan:
    """``data.balance=none``: rank ``r`` takes samples ``[r*G/dp, (r+1)*G/dp)``, in micro-batches."""
    g = costs.shape[0]
    return StepPlan(np.arange(g, dtype=np.int64).reshape(dp, -1, micro_batch_size), costs)


def balance_work(costs: np.ndarray, dp: int, micro_batch_size: int) -> StepPlan:
    """``data.balance=work``: capacity-bounded LPT over dp, then micro-batches by decreasing cost."""
    g = costs.shape[0]
    per_rank = g // dp
    order = np.lexsort((np.arange(g), -costs))  # decreasing cost, ties by ordinal
    load = np.zeros(dp, dtype=np.int64)
    taken: list[list[int]] = [[] for _ in range(dp)]
    for k in order:
        open_ranks = [r for r in range(dp) if len(taken[r]) < per_rank]
        r = min(open_ranks, key=lambda x: (load[x], x))
        taken[r].append(int(k))
        load[r] += costs[k]
    lpt = np.array(taken, dtype=np.int64)  # (dp, G/dp), each row in decreasing cost already
    plain = np.arange(g, dtype=np.int64).reshape(dp, per_rank)
    if _spread(costs[plain]) < _spread(costs[lpt]):
        order_in_rank = np.lexsort((plain, -costs[plain]), axis=1)  # decreasing cost, ties by ordinal
        lpt = np.take_along_axis(plain, order_in_rank, axis=1)
    return StepPlan(lpt.reshape(dp, -1, micro_batch_size), costs)


def _spread(rank_costs: np.ndarray) -> int:
    """Max over ranks of their summed costs: what the busiest rank carries."""
    return int(rank_costs.sum(axis=1).max())


def plan_step(balance: str, costs: np.ndarray, dp: int, micro_batch_size: int) -> StepPlan:
    """The :class:`StepPlan` of ``balance`` ("none" | "work") for one step's sample costs."""
    if balance == "none":
        return in_order(costs, dp, micro_batch_size)
    if balance == "work":
        return balance_work(costs, dp, micro_batch_size)
    raise ValueError(f"data.balance must be one of {BALANCE}, got {balance!r}")
