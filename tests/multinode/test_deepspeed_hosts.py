"""``launch/deepspeed.sh`` with a hostfile of two test hosts (network namespaces with sshd,
tests/helpers/ssh_hosts.py), started on the first: DeepSpeed's launcher reaches both over pdsh and
ssh, one process each at dp=1 cp=2, so every ring step crosses the link; compared bit for bit with the
spawner's run of the same layout on one host; and two processes per host at dp=2 cp=2 (marked slow).

The launcher runs with ``HOME`` a directory of the test's: its ``.deepspeed_env`` (which DeepSpeed's
runner reads from ``~`` and exports on every host) holds the venv's ``PATH`` and one thread per
process, and the ``ssh`` first on its ``PATH`` uses the test's key and known hosts. The processes on
the hosts get root's own ``HOME`` from sshd, as on a cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT, clean_env, losses, ok
from tests.helpers.ssh_hosts import SshHosts
from tests.multinode.launch import RUN, VENV_BIN, output, spawner_run, wait_all

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(240)]
PORT = "29512"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("spawner")
    ok(spawner_run(run_dir))
    return losses(run_dir)


def start_deepspeed(hosts: SshHosts, out: Path, hostfile: str, overrides: tuple[str, ...] = (),
                    **extra: str) -> subprocess.Popen:
    """``launch/deepspeed.sh`` on the first host with ``hostfile`` (its text), the run directory
    ``out/run``; everything it and the hosts' processes print (pdsh brings it back) in ``out/node1/``."""
    home = out / "home"
    home.mkdir(parents=True)
    (home / ".deepspeed_env").write_text(f"PATH={VENV_BIN}:/usr/bin:/bin\nOMP_NUM_THREADS=1\nWANDB_SILENT=true\n")
    (out / "hostfile").write_text(hostfile)
    env = clean_env(HOME=str(home), HOSTFILE=str(out / "hostfile"), MASTER_PORT=PORT, OMP_NUM_THREADS="1",
                    DEEPSPEED=f"{VENV_BIN}/deepspeed", PATH=f"{hosts.bin}:{VENV_BIN}:{os.environ['PATH']}") | extra
    script = ["bash", str(ROOT / "launch" / "deepspeed.sh"), *RUN, *overrides, f"hydra.run.dir={out / 'run'}"]
    return hosts[0].popen(script, env, out / hosts[0].name, cwd=ROOT)


def iface_lines(said: str, host: str) -> list[str]:
    """Why ``host`` took eth0, from each of its lines ``<host>: ... <host>: network interface eth0 (<why>)``."""
    return re.findall(rf"^{host}: .*- {host}: network interface eth0 \((.*)\)$", said, re.MULTILINE)


# MASTER_ADDR unset: the launcher takes the first address of `ssh node1 hostname -I`; or node1's name,
# which is 127.0.1.1 on node1 itself (its hosts file as Debian installs it): there the interface is
# the one the other host reaches it on, not loopback.
@pytest.mark.parametrize("master_addr, node1_iface", [
    (None, "the route to MASTER_ADDR 198.18.0.1"),
    ("node1", "MASTER_ADDR node1 is this host, on loopback here: the interface the other hosts reach"),
], ids=["hostname-I", "name"])
def test_deepspeed_launcher_on_two_hosts_matches_the_one_host_run(master_addr, node1_iface, reference, ssh_hosts,
                                                                  tmp_path):
    hosts = ssh_hosts(2, own_name_on_loopback=True)
    extra = {"MASTER_ADDR": master_addr} if master_addr else {}
    proc = start_deepspeed(hosts, tmp_path, "node1 slots=1\nnode2 slots=1\n", **extra)
    wait_all([proc], timeout=180)
    said = output(tmp_path, "node1")
    assert proc.returncode == 0, said
    assert losses(tmp_path / "run") == reference  # bit for bit on CPU
    assert len(reference) == 4
    # Each host's local rank 0 logs its interface once, and pdsh says which host the line came from.
    assert iface_lines(said, "node1") == [node1_iface], said
    assert iface_lines(said, "node2") == [f"the route to MASTER_ADDR {master_addr or '198.18.0.1'}"], said


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEGARING_MULTINODE_FULL") != "1", reason="a minute more (its own reference, "
                    "four processes on two cores) for what the slurm test's 2 ranks per node cover: "
                    "MEGARING_MULTINODE_FULL=1 runs it")
def test_two_processes_per_host_at_dp2_cp2_match_the_one_host_run(ssh_hosts, tmp_path):
    """slots=2: ranks 0-1 on node1, 2-3 on node2, so some pairs talk within a host and some across;
    each host's interface line still comes once (its local rank 0 only)."""
    cmd = [sys.executable, "-m", "megaring.train", *RUN, "parallel.dp=2", "parallel.nproc_per_node=4",
           f"hydra.run.dir={tmp_path / 'spawner'}"]
    ok(subprocess.run(cmd, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240))
    hosts = ssh_hosts(2, own_name_on_loopback=True)
    proc = start_deepspeed(hosts, tmp_path, "node1 slots=2\nnode2 slots=2\n", ("parallel.dp=2",), MASTER_ADDR="node1")
    wait_all([proc], timeout=180)
    said = output(tmp_path, "node1")
    assert proc.returncode == 0, said
    assert losses(tmp_path / "run") == losses(tmp_path / "spawner")  # bit for bit on CPU
    assert len(losses(tmp_path / "run")) == 4
    assert len(iface_lines(said, "node1")) == 1 and iface_lines(said, "node2") == ["the route to MASTER_ADDR node1"]


def test_a_host_that_does_not_resolve_stops_the_launch_naming_it(netns_hosts, tmp_path):
    """node3 is not a host of this set (nor in its hosts file, and there is no DNS): launch/deepspeed.sh
    exits 2 naming it, before the launcher starts; so does a HOSTFILE that is not a file."""
    hosts = netns_hosts(2)
    (tmp_path / "hostfile").write_text("# two hosts\nnode1 slots=1\n\nnode3 slots=1\n")
    script = ["bash", str(ROOT / "launch" / "deepspeed.sh"), *RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    env = clean_env(DEEPSPEED=f"{VENV_BIN}/deepspeed")
    for hostfile, said in [("hostfile", "host node3 of HOSTFILE="), ("absent", "absent is not a file")]:
        proc = hosts[0].run(script, timeout=30, env=env | {"HOSTFILE": str(tmp_path / hostfile)}, cwd=ROOT)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        # One line, the problem (node1 resolves), and nothing from the launcher: it never started.
        assert said in proc.stderr and len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc.stderr
    assert not (tmp_path / "run").exists()
