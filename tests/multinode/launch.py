"""``launch/torchrun.sh`` on test hosts, and the one-host spawner run it is compared with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from megaring.distributed.net_iface import IFNAME_VARS
from tests.helpers.cli import ROOT, clean_env
from tests.helpers.netns_hosts import Host
from tests.helpers.train_cfg import TINY_RUN

# dp=1 cp=2: with one process per host the ring's every step crosses the link.
RUN = [o for o in TINY_RUN if not o.startswith(("parallel.timeout_s", "trainer.max_steps"))] + [
    "parallel.timeout_s=30", "parallel.cp=2", "parallel.zero_stage=2", "trainer.max_steps=4",
]
PORT = "29511"  # each host set is a network of its own: the same port never meets another run's
VENV_BIN = str(Path(sys.executable).parent)


def host_env(node_rank: int, master_addr: str, **extra: str) -> dict[str, str]:
    """One process per host; one thread per process, as the spawner gives its 2 workers on 2 cores
    (the same threads, so the same float sums: the runs agree bit for bit)."""
    env = {k: v for k, v in clean_env().items() if k not in IFNAME_VARS}  # each host chooses its own
    return env | dict(NNODES="2", NODE_RANK=str(node_rank), NPROC="1", MASTER_ADDR=master_addr, MASTER_PORT=PORT,
                      OMP_NUM_THREADS="1", PYTHON=sys.executable, PATH=f"{VENV_BIN}:{os.environ['PATH']}") | extra


def start_torchrun(hosts: Sequence[Host], out: Path, master_addr: str, overrides: tuple[str, ...] = (),
                   **extra: str) -> list[subprocess.Popen]:
    """``launch/torchrun.sh`` on every host (NODE_RANK = its index), the run directory ``out/run``,
    each host's output in ``out/<host name>/``."""
    script = ["bash", str(ROOT / "launch" / "torchrun.sh"), *RUN, *overrides, f"hydra.run.dir={out / 'run'}"]
    return [h.popen(script, host_env(i, master_addr, **extra), out / h.name, cwd=ROOT) for i, h in enumerate(hosts)]


def output(out: Path, host: str) -> str:
    """A host's stdout and stderr so far."""
    return "".join((out / host / f).read_text(errors="replace") for f in ("stdout.txt", "stderr.txt"))


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[float]:
    """Seconds until each process ended; raises when one is still running after ``timeout``."""
    began, ended = time.monotonic(), [None] * len(procs)
    while None in ended and time.monotonic() - began < timeout:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic() - began
        time.sleep(0.1)
    running = [p.args[-1] for p, e in zip(procs, ended) if e is None]
    assert not running, f"still running after {timeout} s: {running}"
    return ended


def spawner_run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The same layout on this one host, self-spawned (the reference)."""
    cmd = [sys.executable, "-m", "megaring.train", *RUN, "parallel.nproc_per_node=2", *overrides,
           f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
