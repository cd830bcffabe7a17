"""Which network interface carries the job's traffic: the one the kernel routes the master address
through, or ``parallel.net_iface``; exported as ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``.

gloo and NCCL otherwise pick an interface of their own (gloo: the address the host name resolves
to; NCCL: the first that is not loopback or docker), which on hosts with several networks is often
one the other hosts cannot reach. The route to the master is the one every host can use to reach
the first host, so it is the default. On the master host itself that route is loopback when
``MASTER_ADDR`` is its own name and the name resolves to ``127.0.1.1`` there (Debian's hosts file):
then the interface of the default route, or the only interface besides loopback, is the one the
other hosts reach it on. Variables the user exported are left as they are.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_names() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def interface_address(name: str) -> str | None:
    """``name``'s IPv4 address (None: it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def route_interface(address: str) -> str | None:
    """The interface the kernel would send to ``address`` (a host name or IPv4 address) from: a UDP
    socket connected to it (which sends nothing) tells the source address, and the interface holding
    that address is the one. None when the address does not resolve or no interface holds it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(address), 9))
            source = s.getsockname()[0]
    except OSError:
        return None
    for name in interface_names():
        if interface_address(name) == source:
            return name
    return "lo" if source.startswith("127.") and "lo" in interface_names() else None


def default_route_interface(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The interface of this host's IPv4 default route (destination 00000000), None without one."""
    try:
        rows = [line.split() for line in route_table.read_text().splitlines()[1:]]
    except OSError:
        return None
    return next((row[0] for row in rows if len(row) > 1 and row[1] == "00000000"), None)


def outward_interface() -> str | None:
    """The interface other hosts reach this one on: the default route's, else the only interface
    with an IPv4 address besides loopback, else None (undecided)."""
    others = [n for n in interface_names() if not (interface_address(n) or "127.").startswith("127.")]
    return default_route_interface() or (others[0] if len(others) == 1 else None)


def is_loopback_literal(address: str) -> bool:
    return address == "localhost" or address.startswith("127.")


def net_iface_problems(net_iface: str | None) -> list[str]:
    """``parallel.net_iface`` names an interface of this host (checked on every host)."""
    if net_iface is None or net_iface in interface_names():
        return []
    return [f"parallel.net_iface={net_iface!r} is not an interface of {socket.gethostname()} (it has "
            f"{interface_names()}): name one of them, or null to take the route to the master address"]


def choose_interface(master_addr: str, net_iface: str | None, *, announce: bool) -> str | None:
    """Export the interface for gloo and NCCL (``net_iface``, else the route to ``master_addr``)
    unless the user exported one; returns it. ``announce``: log the choice (once per host)."""
    given = {v: os.environ[v] for v in IFNAME_VARS if os.environ.get(v)}
    name = net_iface or route_interface(master_addr)
    how = "parallel.net_iface" if net_iface else f"the route to MASTER_ADDR {master_addr}"
    if name == "lo" and not net_iface and not is_loopback_literal(master_addr):
        # MASTER_ADDR names this host and resolves to loopback here; the other hosts reach it elsewhere.
        name = outward_interface()
        how = f"MASTER_ADDR {master_addr} is this host, on loopback here: the interface the other hosts reach"
    if name is not None:
        for var in IFNAME_VARS:
            os.environ.setdefault(var, name)
    if announce:
        kept = f"; kept as exported: {given}" if given else ""
        log.warning("%s: network interface %s (%s)%s", socket.gethostname(), name or "not identified, left to "
                    "the backends", how, kept)
    return name
