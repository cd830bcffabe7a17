"""A host lost mid-step: the link of the host of rank 1 goes down while rank 1 is inside a ring step
(``ip link set eth0 down`` in its namespace; a test-only sleep holds it there), at dp=1 cp=2 with one
rank per host under ``launch/torchrun.sh``.

Every rank ends within ``parallel.timeout_s`` plus a margin (the hang line's connect probe, up to 3 s,
and the report), with exit 4 and a message naming the lost host, its ranks and, for each rank (both
wait in the ring), the peer and the ring step; ``hang_report.json`` says the same. The first host's
torchrun then exits 1; the cut-off host's, which cannot reach its rendezvous store, is stopped by
``launch/torchrun.sh`` ``WORKERS_ENDED_GRACE_S`` after its worker ended. The checkpoints of the
steps before stay complete, and nothing half-written is left.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers.cli import losses, ok
from tests.multinode.launch import output, spawner_run, start_torchrun, wait_all

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(240)]

TIMEOUT_S = 10
MARGIN_S = 8  # the probe of the master's store (3 s at most) and writing the report, on a busy 2-core machine
GRACE_S = 10  # launch/torchrun.sh's WORKERS_ENDED_GRACE_S (default 60)
FAULT_LINE = "MEGARING_TEST_FAULT: ringsleep on rank 1 at step 3"


def wait_for_the_fault(procs, out, timeout: float = 150) -> None:
    """Until rank 1 (node2's) says it sleeps inside the ring step; every host still running."""
    deadline = time.monotonic() + timeout
    while FAULT_LINE not in output(out, "node2"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), output(out, "node2")
        time.sleep(0.05)


def test_a_host_cut_off_mid_step_is_named_with_its_ranks_and_the_ring_peer(netns_hosts, tmp_path):
    hosts = netns_hosts(2, own_name_on_loopback=True)
    procs = start_torchrun(hosts, tmp_path, hosts[0].name,
                           (f"parallel.timeout_s={TIMEOUT_S}", "trainer.max_steps=6", "trainer.checkpoint_every=1"),
                           MEGARING_TEST_FAULT="ringsleep:rank=1:step=3:seconds=5",
                           WORKERS_ENDED_GRACE_S=str(GRACE_S))
    wait_for_the_fault(procs, tmp_path)
    assert FAULT_LINE not in output(tmp_path, "node1")  # rank 1 is node2's (c10d orders the nodes by name)
    hosts[1].cut()
    ended = wait_all(procs, timeout=120)  # seconds after the cut
    said = {h.name: output(tmp_path, h.name) for h in hosts}
    lost = "lost host node2 (ranks [1]): "
    # Rank 0 times out first (rank 1 entered the ring 5 s later): rank 1 is silent then, and waited on.
    assert f"rank 0 (node1): a collective timed out after parallel.timeout_s={TIMEOUT_S} s; {lost}" in said["node1"]
    assert "it waited on rank 1 (node2): ring K/V recv from rank 1, send to rank 1, at ring step 0" in said["node1"]
    cut_off = f"{lost}it cannot reach the master's store node1:"
    assert f"rank 1 (node2): a collective timed out after parallel.timeout_s={TIMEOUT_S} s; {cut_off}" in said["node2"]
    assert "it waited on rank 0 (node1): ring K/V recv from rank 0, send to rank 0" in said["node2"]
    # node1's torchrun reaps its worker (exit 4) at once and exits 1; node2's, cut off from its store,
    # never would: launch/torchrun.sh stops it WORKERS_ENDED_GRACE_S after its worker ended.
    assert [p.returncode for p in procs] == [1, 1], said
    assert ended[0] < TIMEOUT_S + MARGIN_S, (ended, said["node1"][-2000:])
    assert "every worker ended (worst exit status 4) and torchrun did not within 10 s" in said["node2"]
    assert ended[1] < TIMEOUT_S + MARGIN_S + GRACE_S + 3, (ended, said["node2"][-2000:])

    report = json.loads((tmp_path / "run" / "hang_report.json").read_text())
    assert report["rank_hosts"] == ["node1", "node2"]
    (lost,) = report["lost_hosts"]
    assert lost["host"] == "node2" and lost["ranks"] == [1], report
    line0 = next(line for line in report["ranks"] if line["rank"] == 0)
    assert line0["host"] == "node1" and line0["step"] == 3 and line0["peers"] == [1]
    assert line0["waiting_on"].startswith("ring K/V recv from rank 1, send to rank 1, at ring step 0"), line0

    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000001", "step_00000002"]  # no .partial
    for tag in ("step_00000001", "step_00000002"):
        assert json.loads((ckpt / tag / "trainer_state.json").read_text())["step"] == int(tag[-1])


def test_a_host_whose_processes_are_killed_is_named_and_the_same_command_resumes_bit_identical(
        netns_hosts, tmp_path):
    """node2's torchrun and worker killed (SIGKILL, as when a machine dies) while rank 1 is inside a
    ring step of step 3: rank 0 ends within ``parallel.timeout_s`` plus the margin, naming node2 and
    rank 1; the checkpoints of steps 1-2 are complete. With node2 back, the same command on both
    hosts resumes from step 2 and ends with the uninterrupted run's losses, bit for bit."""
    overrides = (f"parallel.timeout_s={TIMEOUT_S}", "trainer.max_steps=5", "trainer.checkpoint_every=1")
    reference = tmp_path / "reference"
    ok(spawner_run(reference, *overrides))
    hosts = netns_hosts(2, own_name_on_loopback=True)
    procs = start_torchrun(hosts, tmp_path, hosts[0].name, overrides,
                           MEGARING_TEST_FAULT="ringsleep:rank=1:step=3:seconds=30",
                           WORKERS_ENDED_GRACE_S=str(GRACE_S))
    wait_for_the_fault(procs, tmp_path)
    hosts[1].kill_all()
    ended = wait_all(procs[:1], timeout=120)
    said = output(tmp_path, "node1")
    assert procs[0].returncode == 1, said[-3000:]
    assert "lost host node2 (ranks [1])" in said, said[-3000:]
    assert ended[0] < TIMEOUT_S + MARGIN_S, (ended, said[-2000:])
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000001", "step_00000002"]  # no .partial

    procs = start_torchrun(hosts, tmp_path, hosts[0].name, overrides)  # the same command, run dir and all
    wait_all(procs, timeout=180)
    assert [p.returncode for p in procs] == [0, 0], {h.name: output(tmp_path, h.name)[-2000:] for h in hosts}
    want = losses(reference)
    assert [m for m in losses(tmp_path / "run") if m[0] >= 3] == want[2:]  # steps 3-5, resumed from step 2
    assert "resum" in output(tmp_path, "node1").lower()
