"""``launch/torchrun.sh`` on two hosts (network namespaces, tests/helpers/netns_hosts.py), one process
each at dp=1 cp=2, so every ring step crosses the link; compared bit for bit with the spawner's run of
the same layout on one host.

Each host's own name is ``127.0.1.1`` in its hosts file, as Debian installs it. That is the case the
launcher has to get right: with ``MASTER_ADDR`` the first host's IP address, torchrun's own guess of
which host starts the c10d store finds none (no host's name resolves to that address) and every host
waited out the rendezvous timeout; with ``MASTER_ADDR`` its name, the first host's route to it is
loopback, and gloo there listened where the other host cannot connect.
"""

from __future__ import annotations

import pytest

from tests.helpers.cli import losses, ok
from tests.multinode.launch import output, spawner_run, start_torchrun, wait_all

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
