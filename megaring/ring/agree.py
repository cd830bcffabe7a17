"""Cross-rank agreement of a ring attention call: every rank of the ring passes the same shapes and flags.

Each rank checks its own inputs (:func:`megaring.ring.attention.check_inputs`), but a rank that
disagrees with its peers passes those checks: another ``local_seq`` posts transfers of another
size (an abort on one rank, garbage on the other) and ``causal`` on one rank only computes
another mask on each, without any error. So the first call with a given signature all-gathers it
over the ring's axis (one tiny collective of :data:`FIELDS` integers) and every rank raises the
same error, naming each field that differs and each rank's value, before any transfer. Signatures
that agreed are remembered per process group: the steady state of training communicates nothing
more. (A rank whose signature changes while its peers' stays the same is not caught: they skip
the check that it makes.)
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaring.distributed.flight import FLIGHT
from megaring.distributed.mesh import Axis
from megaring.layout import LAYOUTS
from megaring.ring.backward import BACKWARDS

FIELDS = ("batch", "local_seq", "n_heads", "head_dim", "n_kv_heads", "dtype", "causal", "layout", "backward",
          "window", "segment_ids", "positions", "softmax_scale")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LAYOUT_NAMES = LAYOUTS
BACKWARD_NAMES = tuple(sorted(BACKWARDS))

# Signatures every rank of the group agreed on; dropped with the group.
_AGREED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _code(names: tuple, value) -> int:
    return names.index(value) if value in names else -1


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


@dataclass(frozen=True)
class CallSignature:
    """What every rank of the ring must agree on, as one integer per name in :data:`FIELDS`."""

    values: tuple[int, ...]

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, *, causal: bool, layout: str, backward: str,
           window: int | None, segment_ids, positions, scale: float) -> CallSignature:
        b, s, h, d = q.shape  # (B, S_local, H, D); k (B, S_local, H_kv, D)
        return cls((b, s, h, d, k.shape[2], _code(DTYPES, q.dtype), int(bool(causal)), _code(LAYOUT_NAMES, layout),
                    _code(BACKWARD_NAMES, backward), window or 0, int(segment_ids is not None),
                    int(positions is not None), _float_bits(scale)))


def describe(field: str, value: int) -> str:
    """A field's integer as the caller wrote it."""
    if field == "dtype":
        return str(DTYPES[value]) if 0 <= value < len(DTYPES) else "another dtype"
    if field in ("causal", "segment_ids", "positions"):
        return {"causal": ("False", "True")}.get(field, ("not given", "given"))[value]
    if field in ("layout", "backward"):
        names = LAYOUT_NAMES if field == "layout" else BACKWARD_NAMES
        return repr(names[value]) if 0 <= value < len(names) else "unknown"
    if field == "window":
        return str(value or None)
    if field == "softmax_scale":
        return f"{struct.unpack('<d', struct.pack('<q', value))[0]:g}"
    return str(value)


def disagreement(rows: list[tuple[int, ...]], ranks: tuple[int, ...]) -> str | None:
    """The message naming every field on which the ranks' signatures differ (None: they agree)."""
    parts = []
    for i, field in enumerate(FIELDS):
        if len({row[i] for row in rows}) > 1:
            values = ", ".join(f"rank {r}: {describe(field, row[i])}" for r, row in zip(ranks, rows, strict=True))
            parts.append(f"{field} ({values})")
    if not parts:
        return None
    return ("ring_attention: the ranks of the ring disagree on " + "; ".join(parts) + ". Every rank of the cp "
            "group must call it with the same shapes and flags (the same batch and local_seq on every rank)")


def check_agreement(axis: Axis, signature: CallSignature, device: torch.device) -> None:
    """Collective over ``axis`` the first time this group sees ``signature``; raises ValueError on
    every rank when the ranks' signatures differ. Nothing to do on one rank or for a known signature."""
    if axis.size == 1 or axis.group is None:
        return
    agreed = _AGREED.setdefault(axis.group, set())
    if signature.values in agreed:
        return
    on_device = device.type == "cuda" and "nccl" in str(dist.get_backend(axis.group))
    mine = torch.tensor(signature.values, dtype=torch.int64, device=device if on_device else "cpu")
    gathered = [torch.empty_like(mine) for _ in range(axis.size)]
    peers = tuple(r for r in axis.ranks if r != axis.ranks[axis.rank])
    with FLIGHT.waiting("all-gather of ring_attention's call signature over the ring", peers):
        dist.all_gather(gathered, mine, group=axis.group)
    message = disagreement([tuple(t.tolist()) for t in gathered], axis.ranks)
    if message is not None:
        raise ValueError(message)
    agreed.add(signature.values)


def agreed_signatures(axis: Axis) -> int:
    """How many call signatures this rank's group has agreed on (for tests and diagnostics)."""
    return len(_AGREED.get(axis.group, ())) if axis.group is not None else 0
