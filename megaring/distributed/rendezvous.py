"""Launch-time checks of the rendezvous address, and which host starts torchrun's c10d store.

A ``MASTER_ADDR`` that does not resolve, or a ``MASTER_PORT`` that a process on the master host
already listens on, would otherwise show up as a rendezvous that waits out its timeout (minutes), or
as a join into another job's store. ``launch/torchrun.sh`` runs :func:`main` on every host
before torchrun; every rank checks again in
:func:`megaring.distributed.init.init_distributed` (:func:`rendezvous_problems`).

torchrun's c10d rendezvous starts its store on the host whose name or name's addresses match the
endpoint. With ``MASTER_ADDR`` an IP address and the host's own name resolving elsewhere (Debian's
``127.0.1.1 <host>`` line, or a name on another network) no host matches, no host starts the store
and every host waits out the rendezvous timeout. So the launcher says it: the host that holds
``MASTER_ADDR``'s address on one of its interfaces starts it (``--rdzv_conf=is_host=1``), the
others do not (``is_host=0``). Several nodes on one machine (a test) all hold it; ``NODE_RANK`` 0 starts it.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from megaring.distributed.net_iface import interface_address, interface_names


def resolve(addr: str) -> list[str]:
    """``addr``'s IPv4 addresses (raises ``socket.gaierror`` when it does not resolve)."""
    infos = socket.getaddrinfo(addr, None, family=socket.AF_INET, proto=socket.IPPROTO_TCP)
    return sorted({info[4][0] for info in infos})


def host_addresses() -> set[str]:
    """The IPv4 addresses of this host's interfaces."""
    return {a for a in map(interface_address, interface_names()) if a is not None}


def holds(addresses: list[str]) -> bool:
    """One of ``addresses`` is this host's (loopback counts)."""
    mine = host_addresses()
    return any(a.startswith("127.") or a in mine for a in addresses)


def port_in_use(port: int) -> bool:
    """A process on this host listens on TCP ``port`` (bound as a store binds it: any address, reused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def address_problem(master_addr: str) -> str | None:
    try:
        resolve(master_addr)
    except (socket.gaierror, UnicodeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        return (f"MASTER_ADDR={master_addr!r} does not resolve on {socket.gethostname()} ({why}): give the first "
                "host's name as every host resolves it (`getent hosts <name>` on each), or its IP address")
    return None


def port_problem(master_addr: str, port: int) -> str | None:
    """On the master host: ``port`` must be free for the store to start there."""
    if port_in_use(port):
        return (f"MASTER_PORT={port} is already in use on {socket.gethostname()}, the master host "
                f"(MASTER_ADDR={master_addr}): another job's rendezvous, or a run that is still ending; "
                "set MASTER_PORT to a free port, the same on every host")
    return None


def rendezvous_problems(master_addr: str, port: int, *, starts_store: bool) -> list[str]:
    """What keeps the rendezvous at ``master_addr:port`` from starting; ``starts_store``: this process
    is to listen on ``port`` (checked only where ``master_addr`` is this host's)."""
    if not 1 <= port <= 65535:
        return [f"MASTER_PORT={port} is not a TCP port (1..65535)"]
    problem = address_problem(master_addr)
    if problem is None and starts_store and holds(resolve(master_addr)):
        problem = port_problem(master_addr, port)
    return [problem] if problem else []


def is_host(master_addr: str, node_rank: int) -> bool:
    """Whether this torchrun starts the c10d store: its host holds ``master_addr``, and it is node 0 there."""
    return holds(resolve(master_addr)) and node_rank == 0


def main(argv: list[str] | None = None) -> int:
    """For launch/torchrun.sh: print ``is_host=0|1`` (torchrun's ``--rdzv_conf``), or the problems (exit 2)."""
    parser = argparse.ArgumentParser(prog="megaring.distributed.rendezvous")
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--node-rank", type=int, default=0)
    args = parser.parse_args(argv)
    host = not address_problem(args.master_addr) and is_host(args.master_addr, args.node_rank)
    problems = rendezvous_problems(args.master_addr, args.master_port, starts_store=host)
    if problems:
        print("\n".join(f"megaring: {p}" for p in problems), file=sys.stderr)
        return 2
    if not host and holds(resolve(args.master_addr)):
        print(f"megaring: {socket.gethostname()} holds MASTER_ADDR={args.master_addr} but NODE_RANK={args.node_rank}: "
              "joining the rendezvous that NODE_RANK=0 on this machine starts", file=sys.stderr)
    print(f"is_host={int(host)}")
    return 0

