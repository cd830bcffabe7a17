"""Per-step attention metrics: visible query-key pairs (work balance over cp) and K/V bytes sent.

A query at document position ``p`` sees ``min(p + 1, W)`` keys (causal, its own document,
window ``W`` or none), so a rank's visible pairs are a sum over its own tokens: no
communication but two small all-reduces over cp (max and sum of ``[pairs, bytes]``) and one over
``dp_cp`` for the step's total, which the MFU counts instead of dense causal attention. This
assumes the reader's document positions (``data.reset_positions=true``, the default); without
them positions run over the sample and the count is the sample's causal pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaring.distributed.mesh import ParallelMesh


def visible_pairs(micro_batches: list[dict[str, torch.Tensor]], window: int | None) -> int:
    """Causal query-key pairs of this rank's queries in the step's micro-batches."""
    total = 0
    for mb in micro_batches:
        seen = mb["positions"].to(torch.int64) + 1  # (B, S_local) keys each query sees
        total += int((seen if window is None else seen.clamp(max=window)).sum())
    return total


@dataclass(frozen=True)
class AttentionWork:
    pairs_total: int  # visible pairs of the whole step (all dp and cp ranks)
    imbalance: float  # max / mean visible pairs over the cp ranks
    kv_bytes_max: int  # K/V (and dK/dV) bytes sent by the busiest cp rank this step
    kv_bytes_mean: float  # mean over the cp ranks

    def metrics(self) -> dict:
        return {"attn_imbalance": self.imbalance, "kv_bytes_sent_max": self.kv_bytes_max,
                "kv_bytes_sent_mean": self.kv_bytes_mean}


def attention_work(pairs: int, bytes_sent: int, mesh: ParallelMesh, device: torch.device) -> AttentionWork:
    """Reduce this rank's ``pairs`` and ``bytes_sent`` over cp (max, mean) and dp x cp (total)."""
    here = torch.tensor([pairs, bytes_sent], dtype=torch.float64, device=device)
    most, summed, total = here.clone(), here.clone(), here[:1].clone()
    if mesh.cp.size > 1:
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=mesh.cp.group)
        dist.all_reduce(summed, group=mesh.cp.group)
    if mesh.dp_cp.size > 1:
        dist.all_reduce(total, group=mesh.dp_cp.group)
    mean = summed / mesh.cp.size
    return AttentionWork(int(total.item()), float(most[0] / mean[0]) if mean[0] > 0 else 1.0,
                         int(most[1].item()), float(mean[1].item()))
