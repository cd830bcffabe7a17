"""``launch/torchrun.sh`` on two hosts (network namespaces, tests/helpers/netns_hosts.py), one process
each at dp=1 cp=2, so every ring step crosses the link; compared bit for bit with the spawner's run of
the same layout on one host.

Each host's own name is ``127.0.1.1`` in its hosts file, as Debian installs it. That is the case the
launcher has to get right: with ``MASTER_ADDR`` the first host's IP address, torchrun's own guess of
which host starts the c10d store finds none (no host's name resolves to that address) and every host
waited out the rendezvous timeout; with ``MASTER_ADDR`` its name, the first host's route to it is
loopback, and gloo there listened where the other host cannot connect.

The launch-time checks, on the hosts: a ``MASTER_ADDR`` that does not resolve, and a ``MASTER_PORT``
that another process holds on the master host, each end ``launch/torchrun.sh`` at once (exit 2) with
one line naming the problem and the host. An exported interface the other host cannot reach (loopback)
makes the process group's start time out, and the message names that wait.
"""

from __future__ import annotations

import sys
import time

import pytest

from tests.helpers.cli import clean_env, losses, ok
from tests.multinode.launch import PORT, output, spawner_run, start_torchrun, wait_all

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("spawner")
    ok(spawner_run(run_dir))
    return losses(run_dir)


@pytest.mark.parametrize("master", ["name", "address"])
def test_torchrun_on_two_hosts_matches_the_one_host_run(master, reference, netns_hosts, tmp_path):
    hosts = netns_hosts(2, own_name_on_loopback=True)
    master_addr = hosts[0].name if master == "name" else hosts[0].address
    procs = start_torchrun(hosts, tmp_path, master_addr)
    wait_all(procs, timeout=180)
    said = {h.name: output(tmp_path, h.name) for h in hosts}
    assert [p.returncode for p in procs] == [0, 0], said
    assert losses(tmp_path / "run") == reference  # bit for bit on CPU
    assert len(reference) == 4
    # Each host's local rank 0 logs its interface once: the link, on the first host too.
    assert said["node1"].count("node1: network interface eth0 (MASTER_ADDR") == 1, said["node1"]
    assert said["node2"].count("node2: network interface eth0 (the route to MASTER_ADDR node1)") == 1, said["node2"]


LISTEN = ("import socket, time; s = socket.socket(); s.bind(('', {port})); s.listen(); print('listening', flush=True); "
          "time.sleep(120)")


def test_a_master_addr_that_does_not_resolve_stops_the_launch_at_once(netns_hosts, tmp_path):
    """On the second host, a misspelt master (``node1`` is known there, ``nodel`` is not)."""
    hosts = netns_hosts(2)
    (proc,) = start_torchrun([hosts[1]], tmp_path, "nodel")  # as node rank 0 of a one-host list: any rank checks
    (took,) = wait_all([proc], timeout=60)
    said = output(tmp_path, "node2")
    assert proc.returncode == 2, said
    assert "megaring: MASTER_ADDR='nodel' does not resolve on node2 (" in said, said
    assert "torch.distributed" not in said and took < 30  # torchrun never started, nothing waited


def test_a_busy_master_port_on_the_master_host_stops_its_launch(netns_hosts, tmp_path):
    """Another process listens on MASTER_PORT on the first host: its torchrun.sh exits 2 naming the
    port and the host, instead of joining whatever listens there."""
    hosts = netns_hosts(2)
    holder = hosts[0].popen([sys.executable, "-c", LISTEN.format(port=PORT)], clean_env(), tmp_path / "holder")
    deadline = time.monotonic() + 30
    while "listening" not in output(tmp_path, "holder"):
        assert holder.poll() is None and time.monotonic() < deadline, output(tmp_path, "holder")
        time.sleep(0.05)
    (proc,) = start_torchrun([hosts[0]], tmp_path, hosts[0].address)
    wait_all([proc], timeout=60)
    said = output(tmp_path, "node1")
    assert proc.returncode == 2, said
    assert (f"megaring: MASTER_PORT={PORT} is already in use on node1, the master host "
            f"(MASTER_ADDR={hosts[0].address})") in said, said


def test_an_interface_the_other_host_cannot_reach_is_named_in_the_timeout(netns_hosts, tmp_path):
    """Both hosts keep an exported ``GLOO_SOCKET_IFNAME=lo``: gloo on each listens on loopback, the
    process group never connects, and each rank's timeout says it waited on the connections and where
    the interface is chosen."""
    hosts = netns_hosts(2)
    procs = start_torchrun(hosts, tmp_path, hosts[0].name, ("parallel.timeout_s=5",), GLOO_SOCKET_IFNAME="lo")
    wait_all(procs, timeout=120)
    said = {h.name: output(tmp_path, h.name) for h in hosts}
    assert [p.returncode for p in procs] == [1, 1], said
    for h in hosts:
        assert f"{h.name}: network interface eth0 (the route to MASTER_ADDR node1); kept as exported: " \
               "{'GLOO_SOCKET_IFNAME': 'lo'}" in said[h.name], said[h.name][-3000:]
    assert "rank 1 (node2): a collective timed out after parallel.timeout_s=5 s; " in said["node2"], said["node2"]
    assert ("; it waited on rank 0: the gloo process group's connections to every rank (MASTER_ADDR=node1; each host "
            "logged its network interface, parallel.net_iface chooses another)") in said["node2"], said["node2"][-3000:]
