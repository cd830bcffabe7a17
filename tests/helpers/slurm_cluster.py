"""A one-node slurm cluster for the tests: munged, slurmctld and slurmd started by hand.

Everything lives in one directory (``slurm.conf``, munge key and socket, state, spool, logs); the
daemons run as the current user (root on CI) in the foreground, without systemd or cgroups
(``proctrack/linuxproc``, ``task/none``), on free ports, so the cluster does not touch a system
slurm. Accounting is off; ``sacct`` does not work here (the Hydra launcher watches jobs with
``squeue`` then, see ``megaring/ops/slurm_launcher.py``). Client commands find the cluster
through ``SLURM_CONF`` (:attr:`SlurmCluster.env`).

When slurm or munge are missing they are installed with apt-get, and only when this process is
root and apt-get exists (as on CI); otherwise :func:`unavailable_reason` says why not.

By hand: ``python -m tests.helpers.slurm_cluster /tmp/slurm`` starts one, prints the
``export SLURM_CONF=...`` line to use it, and stops it on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "sbatch", "srun", "scontrol", "scancel", "squeue")
PACKAGES = ("slurm-wlm", "munge")
PATH_EXTRA = "/usr/sbin:/sbin"  # the daemons live in sbin, which a non-login PATH may lack
NOT_ENDED = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SIGNALING", "STAGE_OUT", "UNKNOWN")


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{PATH_EXTRA}")


def missing_programs() -> list[str]:
    return [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]


def unavailable_reason(install: bool = True) -> str | None:
    """None when slurm and munge are here (installing them when root with apt-get), else why not."""
    missing = missing_programs()
    if not missing:
        return None
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"slurm is not installed ({', '.join(missing)} missing) and cannot be installed here "
                f"(needs root and apt-get): apt-get install {' '.join(PACKAGES)}")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr[-1000:]}"
    missing = missing_programs()
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_memory_mb() -> int:
    """What the node may offer: 90% of MemTotal, as slurmd would measure it, less headroom."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 9 // 10 // 1024
    return 1024


class SlurmCluster:
    """One node (this machine: all its CPUs, no GPUs) in one partition ``debug``, the default.

    Call :meth:`start`, then run slurm's commands with :attr:`env`; :meth:`stop` cancels what is
    left and ends the daemons. Their logs are ``<root>/log/*.log`` (quoted by :meth:`logs`).
    """

    partition = "debug"
    # A requeued job waits cred_expire + 1 s before it may start again: slurmd keeps the credential
    # of the killed attempt revoked, to the second, and refuses a launch with a credential of the
    # same second ("Killing non-startable batch job: Job credential revoked", the job ends FAILED).
    # 5 s, the least slurm accepts, instead of its 120 keeps the requeue tests short (three requeues
    # wait 6 s each). A credential only has to outlive the moment between slurmctld (or srun) making
    # it and slurmd checking it at the launch, milliseconds, also on a busy machine: the
    # tasks' Python start comes after that check. The schedulers look every second, so the job
    # starts when its delay is over.
    cred_expire_s = 5

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = os.environ | {"SLURM_CONF": str(self.conf),
                                 "PATH": f"{os.environ.get('PATH', '')}:{PATH_EXTRA}"}
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def controller(self) -> str:
        """slurmctld's ``SlurmctldHost``: a node name and the address the others reach it at."""
        return f"{self.node}(127.0.0.1)"

    def nodes(self) -> dict[str, str]:
        """Every node's name and ``NodeAddr``."""
        return {self.node: "127.0.0.1"}

    def on_node(self, node: str, cmd: list[str]) -> list[str]:
        """``cmd`` as run on ``node``: here every node is this machine."""
        return cmd

    def write_config(self) -> None:
        for d in ("munge", "state", "log", "run", *(f"spool/{node}" for node in self.nodes())):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        r = self.root
        # %n: each slurmd's node name, so the slurmds of several nodes on one machine keep apart.
        nodes = "\n".join(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} RealMemory={real_memory_mb()} "
                          "State=UNKNOWN" for name, addr in self.nodes().items())
        self.conf.write_text(f"""\
ClusterName=megaring-test
SlurmctldHost={self.controller()}
SlurmUser={_user()}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 60.0) -> None:
        self.write_config()
        r = self.root
        self._spawn([_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={r}/munge/munge.key", f"--pid-file={r}/run/munged.pid",
                     f"--seed-file={r}/munge/munged.seed", f"--log-file={r}/log/munged.log"], "munged")
        self._wait(lambda: self.munge_socket.exists(), timeout_s, "munged to open its socket")
        self._spawn(self.on_node(self.node, [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)]), "slurmctld")
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0, timeout_s, "slurmctld to answer")
        for node in self.nodes():
            self._spawn(self.on_node(node, [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)]),
                        f"slurmd-{node}")
        self._wait(self.idle, timeout_s, f"nodes {', '.join(self.nodes())} to be idle in sinfo")

    def _spawn(self, cmd: list[str | None], name: str) -> None:
        out = open(self.root / "log" / f"{name}.console", "wb")  # noqa: SIM115 - lives as long as the daemon
        self._procs.append((name, subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True)))

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [name for name, p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout_s:.0f} s"
                raise RuntimeError(f"slurm test cluster: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.25)

    def run(self, *cmd: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A client command (sinfo, sbatch, ...) on slurmctld's node, in ``env`` (default :attr:`env`)."""
        return subprocess.run(self.on_node(self.node, list(cmd)), env=self.env if env is None else env,
                              capture_output=True, text=True, timeout=timeout)

    def idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %t")
        return proc.returncode == 0 and all(f"{node} idle" in proc.stdout.splitlines() for node in self.nodes())

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, ..., COMPLETED, FAILED (finished jobs stay listed for MinJobAge)."""
        return self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip() or "UNKNOWN"

    def wait_job(self, job_id: str, timeout_s: float = 300) -> str:
        """Poll until the job ends; its final state. A requeued job goes on (REQUEUED, PENDING, RUNNING,
        ...) until its last attempt ends. (``sbatch --wait`` polls every few seconds up to 30.)"""
        deadline = time.monotonic() + timeout_s
        while (state := self.job_state(job_id)) in NOT_ENDED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"slurm job {job_id} still {state} after {timeout_s:.0f} s")
            time.sleep(0.2)
        return state

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if any(p.poll() is None for _, p in self._procs[1:]):
            self.run("scancel", "--full", "-u", _user(), timeout=30)
        for _, proc in reversed(self._procs):  # the slurmds, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m tests.helpers.slurm_cluster DIR")
    reason = unavailable_reason()
    if reason:
        sys.exit(reason)
    cluster = SlurmCluster(Path(argv[0]).resolve())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the daemons on kill / timeout too
    cluster.start()
    print(f"one-node slurm up ({cluster.cpus} CPUs, partition {cluster.partition}); Ctrl-C stops it:\n"
          f"  export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
