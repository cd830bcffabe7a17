"""Tiling and chunk sizes of ring attention: one frozen object passed down, never a module global.

- ``mask_entries``: at most this many (batch x query x key) document-mask entries exist at once
  (2^25 is 32 MiB of booleans plus 128 MiB for a kernel's float copy); masked blocks are cut into
  query-row tiles below it.
- ``mask_tile_rows``: query rows per document-mask tile at most: short tiles span few documents,
  so their key ranges stay short.
- ``piece_rows``: the mask-aware ring (:mod:`megaring.ring.pieces`) computes a document piece of
  at least this many query rows in unmasked calls of its own; shorter ones (tiny documents) are
  gathered into masked tiles, so that no kernel call is tiny.
- ``grad_chunks``, ``min_chunk_rows``: the chunked backward cuts each shard into ``grad_chunks``
  chunks of at least ``min_chunk_rows`` rows; a chunk is how K/V and the dK/dV accumulators travel
  and a column of tiles is computed. A GPU kernel call must be large enough to fill the device,
  hence a larger minimum there.
- ``q_tile_pieces``: a backward query tile spans this many of the pieces chunks are made of
  (measured choices in docs/benchmarks.md).

``None`` for the device-dependent sizes means the device's default (:meth:`for_device`).
"""

# No ``from __future__ import annotations``: the trainer's config schema derives its (mutable)
# ``parallel.ring_settings`` from these fields and needs their real types.
import dataclasses
from dataclasses import dataclass

# Defaults per device kind for the sizes that depend on it: (min_chunk_rows, q_tile_pieces).
DEVICE_DEFAULTS = {"cpu": (128, 1), "cuda": (2048, 4)}


@dataclass(frozen=True)
class RingSettings:
    mask_entries: int = 1 << 25
    mask_tile_rows: int = 512
    piece_rows: int = 64
    grad_chunks: int = 8
    min_chunk_rows: int | None = None
    q_tile_pieces: int | None = None

    def for_device(self, device_type: str) -> "RingSettings":
        """These settings with the device-dependent ``None`` sizes filled in."""
        rows, pieces = DEVICE_DEFAULTS["cpu" if device_type == "cpu" else "cuda"]
        return dataclasses.replace(
            self, min_chunk_rows=rows if self.min_chunk_rows is None else self.min_chunk_rows,
            q_tile_pieces=pieces if self.q_tile_pieces is None else self.q_tile_pieces)

    def problems(self) -> list[str]:
        """Every setting below its minimum, as readable lines."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return [f"{name}={value} must be an integer >= 1" for name, value in values.items()
                if value is not None and (not isinstance(value, int) or value < 1)]
