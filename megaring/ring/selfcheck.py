"""A self-check of ring attention on fresh processes: forward and backward against float64 attention.

:func:`check_ring` spawns ``cp`` processes (gloo on CPU, NCCL on GPUs), each holding its shard of
one random sequence in the case's layout, and runs :func:`megaring.ring_attention` with the case's
kernel, ring backward, ring settings, sliding window and dtype. The parent gathers the output and
the gradients of q, k and v and compares them with plain float64 attention over the whole
sequence; it returns the largest error of each relative to the largest reference value.
``megaring-verify`` runs it at the configured cp (:func:`megaring.cli.verify.ring_check`): a
layout or kernel whose ring drops or misplaces a block fails there even when a few training
steps hide it. This module imports no trainer code, so its workers start quickly.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaring.distributed.mesh import Axis
from megaring.kernels import BlockKernel, select_kernel
from megaring.layout import shard_positions, shard_ranges
from megaring.ring.attention import ring_attention
from megaring.ring.dense_reference import masked_reference
from megaring.ring.settings import RingSettings

HEAD_DIM, CHUNK = 16, 16  # tokens per zigzag chunk: the sequence is 2 * cp * CHUNK tokens


@dataclass(frozen=True)
class RingCase:
    """What the check runs: the configured ring attention on a small random sequence."""

    cp: int
    layout: str
    kernel: str | None
    backward: str
    window: int | None
    n_heads: int
    n_kv_heads: int
    dtype: torch.dtype
    settings: RingSettings
    backend: str | None  # None: NCCL with CUDA, else gloo
    drop_block: tuple[int, int] | None = None  # test only: (rank, i) drops that rank's i-th kernel forward call

    @property
    def seq_len(self) -> int:
        return 2 * self.cp * CHUNK

    def describe(self) -> str:
        window = f", window {self.window}" if self.window else ""
        return (f"cp={self.cp} {self.layout} kernel={self.kernel or 'auto'} backward={self.backward} "
                f"{str(self.dtype).removeprefix('torch.')}, heads {self.n_heads}/{self.n_kv_heads}, "
                f"seq_len {self.seq_len}{window}")


def inputs(case: RingCase) -> list[torch.Tensor]:
    """Full-sequence q, k, v and an upstream gradient, (1, S, H or H_kv, D), float64, from a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    shapes = [case.n_heads, case.n_kv_heads, case.n_kv_heads, case.n_heads]
    return [torch.randn(1, case.seq_len, h, HEAD_DIM, generator=g, dtype=torch.float64) for h in shapes]


def reference(case: RingCase) -> list[torch.Tensor]:
    """Out, dq, dk, dv of float64 causal attention (with the window) over the whole sequence."""
    q, k, v, dout = (t.requires_grad_() if i < 3 else t for i, t in enumerate(inputs(case)))
    out = masked_reference(q, k, v, causal=True, window=case.window)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _rows(case: RingCase, rank: int) -> torch.Tensor:
    """This rank's global token indices in the layout (one document, for the balanced layout)."""
    ranges = shard_ranges(case.seq_len, rank, case.cp, case.layout, doc_lengths=(case.seq_len,))
    return torch.cat([torch.arange(a, b) for a, b in ranges])


def _worker(rank: int, case: RingCase, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and case.backend != "gloo"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group(case.backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=case.cp)
    try:
        rows = _rows(case, rank)
        q, k, v, dout = (t[:, rows].to(device, case.dtype) for t in inputs(case))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        positions = None
        if case.layout == "balanced" or case.window:
            positions = shard_positions(case.seq_len, rank, case.cp, case.layout,
                                        doc_lengths=(case.seq_len,)).expand(1, -1).to(device)
        axis = Axis.of_group(dist.group.WORLD, "cp")
        kernel = case.kernel
        if case.drop_block is not None and case.drop_block[0] == rank:
            kernel = DroppedBlock(select_kernel(kernel, q, positions is not None), case.drop_block[1])
        out = ring_attention(q, k, v, group=axis, causal=True, positions=positions, window=case.window,
                             layout=case.layout, kernel=kernel, backward=case.backward, settings=case.settings)
        out.backward(dout)
        local = [t.detach().double().cpu().numpy() for t in (out, q.grad, k.grad, v.grad)]
        results.put((rank, rows.numpy(), local))  # numpy: pickled whole, not shared memory of an exiting process
    finally:
        dist.destroy_process_group()


def check_ring(case: RingCase, timeout_s: float = 600.0) -> dict[str, float]:
    """Run the case on ``case.cp`` new processes; the largest error of out, dq, dk, dv relative to
    the largest value of float64 attention (NaN when the ring made NaN)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(_worker, args=(case, port, results), nprocs=case.cp, join=False,
                               start_method="spawn")
    gathered, deadline = [], time.monotonic() + timeout_s
    while len(gathered) < case.cp:
        try:
            gathered.append(results.get(timeout=1.0))
        except queue.Empty:
            procs.join(timeout=0)  # raises when a worker failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ring attention check did not finish within {timeout_s:g} s") from None
    while not procs.join():
        pass
    expected = reference(case)
    full = [torch.zeros_like(t) for t in expected]
    for _, rows, local in gathered:
        for whole, part in zip(full, local, strict=True):
            whole[:, torch.from_numpy(rows)] = torch.from_numpy(part)
    return {name: ((got - ref).abs().max() / ref.abs().max()).item()
            for name, got, ref in zip(("out", "dq", "dk", "dv"), full, expected, strict=True)}


class DroppedBlock(BlockKernel):
    """Test hook: ``inner``, except that its ``drop``-th forward call (from 0) sees no key (out 0,
    lse -inf), as if that ring step's K/V block had never arrived."""

    def __init__(self, inner: BlockKernel, drop: int):
        self.inner, self.drop, self.calls = inner, drop, 0
        self.name = inner.name

    def supports(self, q, mask):
        return self.inner.supports(q, mask)

    def forward(self, q, k, v, *, scale, causal, mask):
        out, lse = self.inner.forward(q, k, v, scale=scale, causal=causal, mask=mask)
        self.calls += 1
        if self.calls - 1 == self.drop:
            return torch.zeros_like(out), torch.full_like(lse, float("-inf"))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, mask):
        return self.inner.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
