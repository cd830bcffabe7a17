"""ssh between test hosts (tests/helpers/netns_hosts.py): an sshd on every host and a client set up for
them, all under one temporary directory, so that pdsh and ssh (the deepspeed launcher's) reach the hosts
as on a cluster with passwordless ssh. Root's own ``~/.ssh`` is neither read nor written.

Layout of the directory::

    id_ed25519, id_ed25519.pub   the client key; authorized_keys holds its public half
    known_hosts                  every host's key, under its name and its address
    ssh_config                   the client's: that key, that known_hosts, batch mode, short timeouts
    bin/ssh                      ``ssh -F ssh_config "$@"``: first on PATH, for pdsh and the launcher
    <host>/sshd_config, <host>/ssh_host_ed25519_key, <host>/sshd.pid

Each sshd listens on its host's 198.18 address, and on the loopback address that the host's own
name has with ``own_name_on_loopback`` (Debian's sshd listens everywhere); it takes keys only (no
passwords) and lets root log in with a key (``PermitRootLogin prohibit-password``). ``StrictModes
no``: the files lie under /tmp, which is world-writable, and sshd would refuse them. ssh sessions run
in the sshd's namespaces (its network, its /etc/hosts, its host name), each in a session of its own
that killing the sshd's process group misses: :meth:`SshHosts.close` kills every process in the
hosts' network namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.netns_hosts import HostSet, kill_namespace_processes, make_hosts

PACKAGES = ("openssh-server", "openssh-client", "pdsh")
PROGRAMS = ("/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh")
OWN_NAME_LOOPBACK = "127.0.1.1"  # a host's own name with own_name_on_loopback (netns_hosts.py)
PRIVSEP_DIR = Path("/run/sshd")  # sshd's privilege separation directory (the Debian service makes it)


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def unavailable_reason() -> str | None:
    """None when sshd, ssh and pdsh are here (installed with apt-get when root), else why not."""
    if not missing_programs():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(missing_programs())} missing (needs root and apt-get): apt-get install {' '.join(PACKAGES)}"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", *PACKAGES], ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 and not missing_programs():
            return None
    return f"still missing after apt-get install: {', '.join(missing_programs())}"


def keygen(path: Path) -> str:
    """A new ed25519 key at ``path``; returns its public half."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return Path(f"{path}.pub").read_text().strip()


def sshd_config(root: Path, address: str, port: int) -> str:
    here = root / "sshd"
    return "\n".join([
        f"ListenAddress {address}:{port}", f"ListenAddress {OWN_NAME_LOOPBACK}:{port}",
        f"HostKey {here}/ssh_host_ed25519_key", f"PidFile {here}/sshd.pid",
        f"AuthorizedKeysFile {root.parent}/authorized_keys", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "StrictModes no", "UsePAM no", "PrintMotd no", "LogLevel ERROR", "",
    ])


def ssh_config(root: Path, port: int) -> str:
    return "\n".join([
        "Host *", f"  Port {port}", f"  IdentityFile {root}/id_ed25519", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {root}/known_hosts", "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes", "  BatchMode yes", "  ConnectTimeout 5", "  LogLevel ERROR", "",
    ])


@dataclass
class SshHosts:
    hosts: HostSet
    root: Path  # the directory above
    port: int

    @property
    def bin(self) -> Path:
        """The directory of the ``ssh`` wrapper; first on PATH, ssh and pdsh reach the hosts."""
        return self.root / "bin"

    def __getitem__(self, i: int):
        return self.hosts[i]

    def ssh(self, frm: int, to: str, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
        """``ssh <to> cmd`` run on host ``frm``."""
        return self.hosts[frm].run([str(self.bin / "ssh"), to, *cmd], timeout=timeout)

    def close(self) -> None:
        kill_namespace_processes(self.hosts)
        self.hosts.close()


def start_sshd(hosts: HostSet, root: Path, port: int = 22, timeout_s: float = 15) -> SshHosts:
    """An sshd on every host and the client files, under ``root``; returns once every host reaches
    every host (itself too) with ``ssh <name> hostname`` and gets that host's name back."""
    if not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755)
    (root / "authorized_keys").write_text(keygen(root / "id_ed25519") + "\n")
    known = []
    for h in hosts:
        (root / h.name / "sshd").mkdir(parents=True)
        pub = keygen(root / h.name / "sshd" / "ssh_host_ed25519_key")
        known.append(f"{h.name},{h.address} {' '.join(pub.split()[:2])}")
        config = root / h.name / "sshd_config"
        config.write_text(sshd_config(root / h.name, h.address, port))
        h.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], dict(os.environ), root / h.name / "log")
    (root / "known_hosts").write_text("\n".join(known) + "\n")
    (root / "ssh_config").write_text(ssh_config(root, port))
    (root / "bin").mkdir()
    wrapper = root / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    made = SshHosts(hosts, root, port)
    for i in range(len(hosts)):
        for to in hosts:
            wait_for_ssh(made, i, to.name, timeout_s)
    return made


def wait_for_ssh(made: SshHosts, frm: int, to: str, timeout_s: float) -> None:
    began = time.monotonic()
    while True:
        proc = made.ssh(frm, to, "hostname")
        if proc.returncode == 0 and proc.stdout.strip() == to:
            return
        if time.monotonic() - began > timeout_s:
            logs = {h.name: (made.root / h.name / "log" / "stderr.txt").read_text() for h in made.hosts}
            raise AssertionError(f"ssh {to} from {made.hosts[frm].name}: exit {proc.returncode}, {proc.stdout!r}, "
                                 f"{proc.stderr!r}; sshd logs {logs}")
        time.sleep(0.2)


@pytest.fixture
def ssh_hosts(tmp_path_factory):
    """``ssh_hosts(n, own_name_on_loopback=False)``: ``n`` test hosts with sshd; all closed after the test,
    also when it fails (every process in their namespaces killed, then the namespaces removed)."""
    made: list[SshHosts] = []

    def make(n: int, **kwargs) -> SshHosts:
        reason = unavailable_reason()
        if reason:
            pytest.skip(f"ssh between test hosts: {reason}")
        hosts = make_hosts(n, **kwargs)
        try:
            made.append(start_sshd(hosts, tmp_path_factory.mktemp("ssh")))
        except BaseException:
            kill_namespace_processes(hosts)
            hosts.close()
            raise
        return made[-1]

    yield make
    for m in made:
        m.close()
