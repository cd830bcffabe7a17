"""A slurm cluster across test hosts (network namespaces, tests/helpers/netns_hosts.py): one node per host.

    host node1 (198.18.0.1): slurmctld, slurmd -N node1      SlurmctldHost=node1(198.18.0.1)
    host node2 (198.18.0.2): slurmd -N node2                 NodeName=node<i> NodeAddr=198.18.0.<i>

munged runs in this machine's own namespace: its socket is a file, which every host reaches (the
filesystem is shared; a network namespace does not change it). Everything else talks over the
hosts' link: slurmctld and the slurmds, srun on the batch host and the other node's slurmstepd,
and the job's ranks. Client commands (sbatch, squeue, ...) run on node1 (:meth:`SlurmCluster.run`).
Settings, directory layout and logs are those of the one-node cluster (tests/helpers/slurm_cluster.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.netns_hosts import NETNS_ETC, Host, HostSet, kill_namespace_processes
from tests.helpers.slurm_cluster import SlurmCluster

NETNS_RUN = Path("/run/netns")  # where `ip netns add` keeps a namespace


def on_host(host: Host, cmd: list[str]) -> list[str]:
    """``cmd`` on ``host`` as :meth:`Host.command` runs it (its network, hosts file and host name), but
    with this machine's ``/sys``: ``ip netns exec`` mounts the namespace's own sysfs there, which hides
    ``/sys/fs/cgroup``, and slurmd does not start without its cgroup plugin (also with proctrack/linuxproc)."""
    etc = NETNS_ETC / host.netns
    binds = " && ".join(f"mount --bind {etc / name} /etc/{name}" for name in ("hosts", "resolv.conf"))
    return ["nsenter", f"--net={NETNS_RUN / host.netns}", "unshare", "--mount", "--propagation", "private",
            "--uts", "sh", "-c", f'{binds} && hostname "$0" && exec "$@"', host.name, *cmd]


class HostsSlurmCluster(SlurmCluster):
    """One slurm node per host, ``cpus`` CPUs each (declared: the hosts share this machine's cores),
    all in partition ``debug``; :meth:`stop` also kills whatever the jobs left in the hosts."""

    def __init__(self, root: Path, hosts: HostSet, cpus: int = 2) -> None:
        super().__init__(root)
        self.hosts = {h.name: h for h in hosts.hosts}
        self.node = hosts[0].name  # slurmctld's host, where the client commands run
        self.cpus = cpus

    def controller(self) -> str:
        return f"{self.node}({self.hosts[self.node].address})"

    def nodes(self) -> dict[str, str]:
        return {name: h.address for name, h in self.hosts.items()}

    def on_node(self, node: str, cmd: list[str]) -> list[str]:
        return on_host(self.hosts[node], cmd)

    def host_of(self, pid: int) -> str | None:
        """The host whose network ``pid`` lives in (None: none of them, or the process is gone)."""
        try:
            net = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        return next((name for name, h in self.hosts.items() if (NETNS_RUN / h.netns).stat().st_ino == net), None)

    def stop(self) -> None:
        super().stop()
        kill_namespace_processes(self.hosts.values())  # a task that outlived its job (slurmstepd ends the rest)
