"""Launch-time checks of the rendezvous address (megaring/distributed/rendezvous.py) and the hang
report's lost hosts (megaring/distributed/flight.py), single process: the parts the multi-node tests
(tests/multinode/) exercise across hosts, here with every case spelled out."""

from __future__ import annotations

import socket

import pytest

from megaring.distributed.flight import lost_hosts, timeout_message
from megaring.distributed.rendezvous import is_host, main, rendezvous_problems


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_name_that_does_not_resolve_is_named(capsys):
    (problem,) = rendezvous_problems("no-such-host.invalid", 29500, starts_store=True)
    assert problem.startswith("MASTER_ADDR='no-such-host.invalid' does not resolve on ")
    assert main(["--master-addr", "no-such-host.invalid", "--master-port", "29500"]) == 2
    assert "megaring: MASTER_ADDR='no-such-host.invalid' does not resolve" in capsys.readouterr().err


def test_a_busy_port_is_named_only_where_the_store_starts(busy_port, capsys):
    (problem,) = rendezvous_problems("127.0.0.1", busy_port, starts_store=True)
    assert problem.startswith(f"MASTER_PORT={busy_port} is already in use on {socket.gethostname()}, the master host")
    assert rendezvous_problems("127.0.0.1", busy_port, starts_store=False) == []  # a client: the store is there
    assert main(["--master-addr", "127.0.0.1", "--master-port", str(busy_port)]) == 2
    assert f"MASTER_PORT={busy_port} is already in use" in capsys.readouterr().err
    (not_a_port,) = rendezvous_problems("127.0.0.1", 70000, starts_store=False)
    assert not_a_port == "MASTER_PORT=70000 is not a TCP port (1..65535)"


def test_node_rank_0_on_the_host_holding_master_addr_starts_the_store(busy_port, capsys):
    assert is_host("127.0.0.1", 0) and not is_host("127.0.0.1", 1)
    assert not is_host("198.19.255.254", 0)  # an address of no interface here
    assert main(["--master-addr", "127.0.0.1", "--master-port", str(busy_port), "--node-rank", "1"]) == 0
    out = capsys.readouterr()
    assert out.out == "is_host=0\n" and "NODE_RANK=1: joining the rendezvous" in out.err


def line(rank: int, host: str, peers: list[int], hosts: list[str], reachable: bool | None = None) -> dict:
    master = None if reachable is None else {"addr": "node1:29500", "reachable": reachable}
    return {"rank": rank, "host": host, "peers": peers, "waiting_on": "ring K/V recv" if peers else None,
            "rank_hosts": hosts, "master": master, "step": 3, "micro_batch": 0, "phase": "forward", "waited_s": 10.0}


HOSTS = ["node1", "node1", "node2", "node2"]


def test_a_host_that_cannot_reach_the_master_is_lost_with_its_ranks():
    lines = [line(0, "node1", [2], HOSTS, True), line(2, "node2", [0], HOSTS, False)]
    assert lost_hosts(lines, silent=[1, 3], hosts=HOSTS) == [
        {"host": "node2", "ranks": [2, 3], "why": "it cannot reach the master's store node1:29500"}]


def test_a_silent_host_that_others_wait_on_is_lost():
    lines = [line(0, "node1", [2], HOSTS, True), line(1, "node1", [3], HOSTS, True)]
    (lost,) = lost_hosts(lines, silent=[2, 3], hosts=HOSTS)
    assert lost["host"] == "node2" and lost["ranks"] == [2, 3] and "ranks [0, 1] on other hosts wait" in lost["why"]
    # One rank of node2 reported: node2 is not silent, so it is not named on silence alone.
    assert lost_hosts([*lines, line(2, "node2", [], HOSTS, True)], silent=[3], hosts=HOSTS) == []
    assert lost_hosts(lines[:1], silent=[1, 2, 3], hosts=["node1"] * 4) == []  # one host: nothing to tell apart


def test_the_timeout_message_names_the_lost_host_and_the_peer_or_else_the_stalled_rank():
    hosts = ["node1", "node2"]
    lines = [line(0, "node1", [1], hosts, True), line(1, "node2", [0], hosts, False)]
    report = {"ranks": lines, "stalled_ranks": [], "lost_hosts": lost_hosts(lines, [], hosts), "rank_hosts": hosts}
    assert timeout_message(report, 0, 10) == (
        "rank 0 (node1): a collective timed out after parallel.timeout_s=10 s; lost host node2 (ranks [1]): "
        "it cannot reach the master's store node1:29500; it waited on rank 1 (node2): ring K/V recv")
    one_host = {"ranks": [line(0, "vm", [1], [])], "stalled_ranks": [1], "lost_hosts": [], "rank_hosts": []}
    assert timeout_message(one_host, 0, 10) == (
        "rank 0 (vm): a collective timed out after parallel.timeout_s=10 s; stalled rank(s): [1]; "
        "it waited on rank 1: ring K/V recv")
