"""`make demo`: the main job on an embedded default.

Until the trainer lands this runs the ring-attention benchmark on a short sequence.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_attention  # noqa: E402

if __name__ == "__main__":
    bench_attention.main(["--seq-len", "2048", "--cp", "2", "--layout", "both", "--iters", "3"])
