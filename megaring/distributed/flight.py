"""What this process is waiting on, for hang reports: a flight recorder of collectives and ring steps.

Communicating code wraps each blocking wait in ``FLIGHT.waiting(what, peers, group)``; the
trainer sets the position (step, micro-batch, phase). When a wait outlives the bound
(:class:`HangWatch`, a daemon thread) or the operator sends SIGUSR2, the rank writes one JSON
line to ``<run dir>/hang/rank_NNNNN.json`` and merges every rank's line found there into
``<run dir>/hang_report.json``: who waits on whom, and which ranks are silent or not waiting
(the stalled ones). No collective is involved, so it works while the collectives are stuck.

Across hosts (the trainer records every rank's host once the group is up, :meth:`FlightRecorder.joined`)
each line also says whether its rank still reaches the master's store (a TCP connect, nothing sent),
and the report names the lost hosts with their ranks: a host whose ranks cannot reach the master
(its link, or the master's, is cut), else a host whose ranks are all silent while ranks of other hosts
wait on them. A partition leaves every rank waiting on a peer, so "stalled" alone names no one.

``FLIGHT`` is one process-wide object on purpose, like a logger: it only records, and nothing
reads it to decide what to compute. The one exception is :attr:`FlightRecorder.before_wait`, a
hook that only the test suite sets (``MEGARING_TEST_FAULT=ringsleep:...``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HANG_DIR, REPORT_NAME = "hang", "hang_report.json"


@dataclass(frozen=True)
class Wait:
    what: str  # e.g. "ring K/V recv from rank 0, send to rank 0, at ring step 1"
    peers: tuple[int, ...]  # global ranks this wait needs
    since: float  # time.monotonic()


class FlightRecorder:
    def __init__(self):
        self.step: int | None = None
        self.micro_batch: int | None = None
        self.phase: str | None = None  # "forward" | "backward" | "optimizer step" | "checkpoint" ...
        self.waits: list[Wait] = []  # innermost last
        self.failed: Wait | None = None  # the wait that last ended in an error (a timeout)
        self.before_wait: Callable[[str], None] | None = None  # test hook: called before a wait begins
        self.hosts: list[str] = []  # every rank's host, by global rank (joined)
        self.master: tuple[str, int] | None = None  # the store every rank reaches (MASTER_ADDR, MASTER_PORT)

    def joined(self, hosts: list[str], master: tuple[str, int]) -> None:
        """The process group is up: every rank's host, and the master's store."""
        self.hosts, self.master = list(hosts), master

    def at(self, *, step: int | None = None, micro_batch: int | None = None, phase: str | None = None) -> None:
        if step is not None:
            self.step, self.micro_batch = step, None
        if micro_batch is not None:
            self.micro_batch = micro_batch
        if phase is not None:
            self.phase = phase

    @contextmanager
    def waiting(self, what: str, peers: tuple[int, ...] = ()) -> Iterator[None]:
        if self.before_wait is not None:
            self.before_wait(what)
        wait = Wait(what, tuple(peers), time.monotonic())
        self.waits.append(wait)
        try:
            yield
        except BaseException:
            self.failed = wait
            raise
        finally:
            self.waits.pop()

    def line(self, rank: int) -> dict:
        now = time.monotonic()
        inner = self.waits[-1] if self.waits else self.failed
        return {
            "rank": rank, "host": os.uname().nodename, "pid": os.getpid(), "step": self.step,
            "micro_batch": self.micro_batch, "phase": self.phase,
            "waiting_on": inner.what if inner else None, "peers": list(inner.peers) if inner else [],
            "waited_s": round(now - inner.since, 1) if inner else None,
            "outer": [w.what for w in self.waits[:-1]],
        }


FLIGHT = FlightRecorder()


def write_hang_line(run_dir: Path, rank: int, world_size: int, reason: str) -> dict:
    """This rank's line into ``run_dir/hang/``, then the merged report; returns the report."""
    out = Path(run_dir) / HANG_DIR
    out.mkdir(parents=True, exist_ok=True)
    line = FLIGHT.line(rank) | {"reason": reason, "rank_hosts": FLIGHT.hosts, "master": probe_master()}
    _atomic_json(out / f"rank_{rank:05d}.json", line)
    report = merge_hang_report(Path(run_dir), world_size)
    print(f"megaring-train: rank {rank}: {reason}; {describe_line(line)}\n{report_table(report)}",
          file=sys.stderr, flush=True)
    return report


def probe_master(timeout_s: float = 3.0) -> dict | None:
    """Whether this rank still reaches the master's store (None on one host: nothing to tell apart)."""
    if FLIGHT.master is None or len(set(FLIGHT.hosts)) < 2:
        return None
    addr, port = FLIGHT.master
    try:
        with socket.create_connection((addr, port), timeout=timeout_s):
            reachable = True
    except OSError:
        reachable = False
    return {"addr": f"{addr}:{port}", "reachable": reachable}


def merge_hang_report(run_dir: Path, world_size: int) -> dict:
    lines = []
    for f in sorted((run_dir / HANG_DIR).glob("rank_*.json")):
        try:
            lines.append(json.loads(f.read_text()))
        except ValueError:
            continue  # being written
    reported = {line["rank"]: line for line in lines}
    silent = [r for r in range(world_size) if r not in reported]
    waited_on = sorted({p for line in lines if line["waiting_on"] for p in line["peers"]})
    # A rank others wait on that is silent, or that reported and is not itself waiting, holds the rest up.
    stalled = [p for p in waited_on if p not in reported or not reported[p]["waiting_on"]]
    hosts = next((line["rank_hosts"] for line in lines if line.get("rank_hosts")), [])
    lines = [{k: v for k, v in line.items() if k != "rank_hosts"} for line in lines]  # once, in the report
    report = {"world_size": world_size, "stalled_ranks": stalled, "silent_ranks": silent,
              "lost_hosts": lost_hosts(lines, silent, hosts), "rank_hosts": hosts, "ranks": lines}
    _atomic_json(run_dir / REPORT_NAME, report)
    return report


def lost_hosts(lines: list[dict], silent: list[int], hosts: list[str]) -> list[dict]:
    """``[{"host", "ranks", "why"}]``: hosts whose ranks cannot reach the master; failing that (no
    rank said so), hosts whose every rank is silent while ranks of other hosts wait on them."""
    if len(set(hosts)) < 2:
        return []
    ranks_of: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        ranks_of.setdefault(h, []).append(r)
    cut = {line["host"]: f"it cannot reach the master's store {line['master']['addr']}"
           for line in lines if line.get("master") and not line["master"]["reachable"]}
    if not cut:
        for h, ranks in ranks_of.items():
            waiters = [line["rank"] for line in lines if line["host"] != h and set(line["peers"]) & set(ranks)]
            if waiters and all(r in silent for r in ranks):
                cut[h] = f"its ranks are silent and ranks {waiters} on other hosts wait on them"
    return [{"host": h, "ranks": ranks_of.get(h, []), "why": why} for h, why in cut.items()]


def describe_lost(report: dict) -> str | None:
    """``lost host node2 (ranks [1]): it cannot reach ...`` for each lost host; None: none."""
    lost = [f"lost host {h['host']} (ranks {h['ranks']}): {h['why']}" for h in report.get("lost_hosts", [])]
    return "; ".join(lost) or None


def describe_peers(line: dict, hosts: list[str]) -> str:
    """``rank 1 (node2), rank 2 (node3)``: the ranks this line waits on, with their hosts when known."""
    return ", ".join(f"rank {p} ({hosts[p]})" if p < len(hosts) else f"rank {p}" for p in line["peers"])


def timeout_message(report: dict, rank: int, timeout_s: float) -> str:
    """What a rank whose collective timed out says: the lost hosts (or the stalled ranks) and its own wait."""
    line = next((line for line in report["ranks"] if line["rank"] == rank), None)
    head = f"rank {rank}" + (f" ({line['host']})" if line else "")
    who = describe_lost(report) or f"stalled rank(s): {report['stalled_ranks'] or 'not identified'}"
    waited = ""
    if line and line["waiting_on"]:
        waited = f"; it waited on {describe_peers(line, report.get('rank_hosts', []))}: {line['waiting_on']}"
    return f"{head}: a collective timed out after parallel.timeout_s={timeout_s:g} s; {who}{waited}"


def describe_line(line: dict) -> str:
    where = f"step {line['step']}, micro-batch {line['micro_batch']}, {line['phase']}"
    if not line["waiting_on"]:
        return f"{where}: not waiting on another rank"
    return f"{where}: waiting {line['waited_s']} s on {line['waiting_on']}"


def report_table(report: dict) -> str:
    rows = [f"  rank {line['rank']:>5} ({line['host']}): {describe_line(line)}" for line in report["ranks"]]
    stalled = ", ".join(map(str, report["stalled_ranks"])) or "none identified"
    silent = ", ".join(map(str, report["silent_ranks"])) or "none"
    lost = [f"  {text}" for text in [describe_lost(report)] if text]
    return "\n".join(["hang report (hang_report.json):", *rows, f"  silent ranks: {silent}",
                      f"  stalled rank(s), waited on and not waiting themselves: {stalled}", *lost])


class HangWatch:
    """A daemon thread: when this rank's innermost wait passes ``after_s``, write the hang line once
    per wait; SIGUSR2 writes it at once (:meth:`on_signal`)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, after_s: float):
        self.run_dir, self.rank, self.world_size, self.after_s = Path(run_dir), rank, world_size, after_s
        self.reported: Wait | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="megaring-hang-watch", daemon=True)

    def start(self) -> HangWatch:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()

    def on_signal(self, signum, frame) -> None:
        write_hang_line(self.run_dir, self.rank, self.world_size, "SIGUSR2 (hang report asked for)")

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            waits = list(FLIGHT.waits)
            inner = waits[-1] if waits else None
            if inner is not None and inner is not self.reported and time.monotonic() - inner.since > self.after_s:
                self.reported = inner
                write_hang_line(self.run_dir, self.rank, self.world_size,
                                f"a wait passed {self.after_s:g} s (parallel.timeout_s bounds it)")


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
