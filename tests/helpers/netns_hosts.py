"""Test hosts on this machine: 2 to 4 Linux network namespaces on one private link, each a "host".

Layout (``tag`` is random per set, so sets made at the same time never meet)::

    namespace mr<tag>b (the switch): bridge br0, ports p1 .. pN
    namespace mr<tag>h<i> (host i):  eth0 198.18.0.<i>/24 (veth, peer p<i>), lo; host name node<i>

Only addresses of 198.18.0.0/15 (RFC 2544, benchmarking) are used, no route leaves the link, and the
root namespace is not touched: the veth ends are made inside their namespaces. Each host has
``/etc/netns/<namespace>/hosts`` (``ip netns exec`` mounts it over ``/etc/hosts``) naming every host,
and an empty ``resolv.conf``, so a name that is not a host fails at once instead of asking a DNS
server. With ``own_name_on_loopback`` a host's own name is ``127.0.1.1`` in its hosts file, as
Debian and Ubuntu install it (the others still see its link address).

:meth:`Host.popen` runs a command on a host (its own UTS namespace with its host name) in a session of
its own; :meth:`HostSet.close` kills every such process group, then deletes the namespaces and their
``/etc/netns`` directories. :func:`make_hosts` skips the test, with the reason, where namespaces
cannot be made (not root, no ``ip`` or ``unshare``, no permission).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NETNS_ETC = Path("/etc/netns")
PREFIX = "198.18.0."  # host i is PREFIX + str(i), i = 1 .. 4
LINK = "eth0"  # each host's interface (its own namespace, so the name is free)


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class Host:
    name: str  # host name inside it, and in every host's hosts file
    netns: str
    address: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run on this host: its namespace, its /etc/netns files, its host name."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *cmd]

    def popen(self, cmd: list[str], env: dict[str, str], out_dir: Path, **kwargs) -> subprocess.Popen:
        """``cmd`` started on this host in a new session, stdout and stderr to ``out_dir/{stdout,stderr}.txt``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "stdout.txt", "w") as out, open(out_dir / "stderr.txt", "w") as err:
            proc = subprocess.Popen(self.command(cmd), env=env, stdout=out, stderr=err, text=True,
                                    start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)

    def cut(self) -> None:
        """This host's link down (inside its namespace): the others can no longer reach it."""
        ip("-n", self.netns, "link", "set", LINK, "down")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class HostSet:
    tag: str
    hosts: list[Host]
    namespaces: list[str]

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def close(self) -> None:
        for host in self.hosts:
            host.kill_all()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def kill_namespace_processes(hosts) -> None:
    """SIGKILL every process in the hosts' network namespaces (daemons such as sshd or slurmd, and what
    they started in sessions of their own, which killing the started process groups misses)."""
    for host in hosts:
        proc = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=10)
        for pid in map(int, proc.stdout.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def hosts_file(hosts: list[Host], me: Host, own_name_on_loopback: bool) -> str:
    lines = ["127.0.0.1 localhost"]
    for h in hosts:
        lines.append(f"{'127.0.1.1' if h is me and own_name_on_loopback else h.address} {h.name}")
    return "\n".join(lines) + "\n"


def make_hosts(n: int, *, own_name_on_loopback: bool = False) -> HostSet:
    """``n`` (2 to 4) hosts on one bridge; the caller closes them (the ``netns_hosts`` fixture does)."""
    assert 2 <= n <= 4, n
    if os.geteuid() != 0:
        pytest.skip("test hosts are network namespaces: they need root")
    missing = [tool for tool in ("ip", "unshare", "hostname") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"test hosts need {', '.join(missing)} (iproute2, util-linux)")
    tag = uuid.uuid4().hex[:6]
    switch = f"mr{tag}b"
    hosts = [Host(f"node{i}", f"mr{tag}h{i}", PREFIX + str(i)) for i in range(1, n + 1)]
    made = HostSet(tag, hosts, [])
    try:
        for ns in (switch, *(h.netns for h in hosts)):
            ip("netns", "add", ns)
            made.namespaces.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for i, h in enumerate(hosts, start=1):
            ip("link", "add", LINK, "netns", h.netns, "type", "veth", "peer", "name", f"p{i}", "netns", switch)
            ip("-n", switch, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", LINK)
            ip("-n", h.netns, "link", "set", LINK, "up")
            etc = NETNS_ETC / h.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file(hosts, h, own_name_on_loopback))
            (etc / "resolv.conf").write_text("# test host: no DNS\n")
    except OSError as err:
        made.close()
        pytest.skip(f"test hosts (network namespaces) cannot be made here: {err}")
    return made


@pytest.fixture
def netns_hosts():
    """``netns_hosts(n, own_name_on_loopback=False)`` makes a set; every set is closed after the test,
    also when it fails (processes killed by process group, namespaces and /etc/netns files removed)."""
    sets: list[HostSet] = []

    def make(n: int, **kwargs) -> HostSet:
        sets.append(make_hosts(n, **kwargs))
        return sets[-1]

    yield make
    for s in sets:
        s.close()
