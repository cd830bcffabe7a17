"""``sbatch --nodes=2 launch/slurm.sbatch`` on a slurm cluster of two test hosts (tests/helpers/slurm_hosts.py),
in both modes, at dp=2 cp=2 with two ranks per node; compared bit for bit with the spawner's run of the
same layout on one host.

Task mode places the ranks cyclically (``--distribution=cyclic``: ranks 0, 2 on node1, 1, 3 on node2),
so both cp rings cross the link at every ring step; torchrun mode places them by node (ranks 0, 1 on
node1), so the cp rings stay on a host and the dp (ZeRO) reductions cross. Each host's own name is
``127.0.1.1`` in its hosts file, as Debian installs it; ``MASTER_ADDR`` is the script's first host
of the allocation, node1.

A Hydra sweep through the slurm launcher (``hydra/launcher=slurm_cpu``, nodes of two ranks) sizes each
of its two jobs 2 nodes x 2 tasks; they run there and match the same one-host run.

Which host each rank ran on is read from the running processes (their slurm job and rank in their
environment, their network namespace: the host), not from the jobs' own logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT, clean_env, losses, ok
from tests.helpers.netns_hosts import make_hosts
from tests.helpers.slurm_cluster import NOT_ENDED, unavailable_reason
from tests.helpers.slurm_hosts import HostsSlurmCluster
from tests.helpers.train_cfg import TINY_RUN

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.timeout(240)]

STEPS = 4
RUN = [o for o in TINY_RUN if not o.startswith(("parallel.timeout_s", "trainer.max_steps"))] + [
    "parallel.timeout_s=30", "parallel.dp=2", "parallel.cp=2", "parallel.zero_stage=2", f"trainer.max_steps={STEPS}",
]
BIN = str(Path(sys.executable).parent)
# Two ranks per node: two tasks of one CPU, or one task running torchrun for both.
SBATCH_SIZES = {"task": ["--ntasks-per-node=2", "--cpus-per-task=1", "--distribution=cyclic"],
                "torchrun": ["--ntasks-per-node=1", "--cpus-per-task=2"]}
CYCLIC = {0: "node1", 1: "node2", 2: "node1", 3: "node2"}  # rank -> host
BY_NODE = {0: "node1", 1: "node1", 2: "node2", 3: "node2"}  # slurm's default distribution, and torchrun's
PLACEMENT = {"task": CYCLIC, "torchrun": BY_NODE}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two hosts, slurm across them, for this module; everything is stopped and removed after it."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    hosts = make_hosts(2, own_name_on_loopback=True)
    made = HostsSlurmCluster(tmp_path_factory.mktemp("slurm_hosts"), hosts)
    try:
        made.start()
        yield made
    finally:
        made.stop()
        hosts.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same layout on this one host, self-spawned: one thread per rank, as the jobs have."""
    run_dir = tmp_path_factory.mktemp("spawner") / "run"
    cmd = [sys.executable, "-m", "megaring.train", *RUN, "parallel.nproc_per_node=4", f"hydra.run.dir={run_dir}"]
    ok(subprocess.run(cmd, cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180))
    return losses(run_dir)


def job_env(cluster: HostsSlurmCluster, mode: str) -> dict[str, str]:
    """What sbatch hands to the job: this venv and checkout (PYTHONPATH), the cluster, one thread per rank."""
    return clean_env(PATH=f"{BIN}:{cluster.env['PATH']}", SLURM_CONF=cluster.env["SLURM_CONF"], PYTHON=sys.executable,
                     OMP_NUM_THREADS="1", MODE=mode, **({"GPUS_PER_NODE": "2"} if mode == "torchrun" else {}))


def rank_processes(slurm_conf: Path) -> dict[str, dict[int, int]]:
    """slurm job id -> global rank -> pid of every training process of this cluster running now (job ids
    repeat across test clusters, its SLURM_CONF does not): Python running
    ``-m megaring.train`` (slurm's task, rank SLURM_PROCID, or torchrun's worker, rank RANK) or
    ``-m submitit.core._submit`` (a sweep's task). srun and torchrun's agent, which name megaring.train
    in their arguments too, run other programs."""
    found: dict[str, dict[int, int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"python" not in argv[0].rsplit(b"/", 1)[-1] or b"-m" not in argv[:-1]:
                continue
            if argv[argv.index(b"-m") + 1] not in (b"megaring.train", b"submitit.core._submit"):
                continue
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:  # ended meanwhile
            continue
        if env.get(b"SLURM_CONF") == str(slurm_conf).encode() and b"SLURM_JOB_ID" in env:
            rank = int(env.get(b"RANK", env.get(b"SLURM_PROCID", b"-1")))
            found.setdefault(env[b"SLURM_JOB_ID"].decode(), {})[rank] = int(proc.name)
    return found


class PlacementWatch:
    """Which host each rank of each job ran on, from repeated looks at the running processes."""

    def __init__(self, cluster: HostsSlurmCluster) -> None:
        self.cluster = cluster
        self.hosts: dict[str, dict[int, str | None]] = {}  # job id -> rank -> host

    def look(self) -> None:
        for job_id, ranks in rank_processes(self.cluster.conf).items():
            for rank, pid in ranks.items():
                self.hosts.setdefault(job_id, {}).setdefault(rank, self.cluster.host_of(pid))

    def of(self, job_id: str) -> dict[int, str | None]:
        return dict(sorted(self.hosts.get(job_id, {}).items()))


def watch_job(cluster: HostsSlurmCluster, job_id: str, timeout_s: float) -> tuple[str, dict[int, str]]:
    """Wait for the job to end, meanwhile noting which host each rank runs on; (final state, rank -> host)."""
    deadline, watch = time.monotonic() + timeout_s, PlacementWatch(cluster)
    while (state := cluster.job_state(job_id)) in NOT_ENDED:
        assert time.monotonic() < deadline, f"slurm job {job_id} still {state} after {timeout_s} s"
        watch.look()
        time.sleep(0.2)
    return state, watch.of(job_id)


@pytest.mark.parametrize("mode", ["task", "torchrun"])
def test_sbatch_on_two_nodes_matches_the_one_host_run(mode, cluster, reference, tmp_path):
    cmd = ["sbatch", "--parsable", "--nodes=2", *SBATCH_SIZES[mode], "--gpus-per-node=0",
           f"--output={tmp_path}/slurm-%j.out", f"--chdir={ROOT}", "launch/slurm.sbatch", *RUN,
           f"hydra.run.dir={tmp_path / 'run'}"]
    submitted = cluster.run(*cmd, env=job_env(cluster, mode))
    ok(submitted)
    job_id = submitted.stdout.strip().split(";")[0]
    state, placement = watch_job(cluster, job_id, 180)
    out = tmp_path / f"slurm-{job_id}.out"
    output = out.read_text(errors="replace") if out.is_file() else ""
    assert state == "COMPLETED", f"{output[-6000:]}\n{cluster.logs()}"
    assert f"megaring: mode={mode} nodes=2 tasks={2 if mode == 'torchrun' else 4} master=node1:" in output, output
    # Each host's local rank 0 names the link (node1: not loopback, where its own name points there).
    assert output.count("node1: network interface eth0 (MASTER_ADDR node1 is this host") == 1, output
    assert output.count("node2: network interface eth0 (the route to MASTER_ADDR node1)") == 1, output
    assert placement == PLACEMENT[mode], placement
    assert losses(tmp_path / "run") == reference  # (step, loss, grad norm), bit for bit on CPU
    assert [step for step, _, _ in reference] == list(range(1, STEPS + 1))


def test_a_hydra_sweep_through_the_slurm_launcher_runs_each_job_on_two_nodes(cluster, reference, tmp_path):
    """``hydra/launcher=slurm_cpu`` with nodes of two ranks: both jobs (ZeRO 1 and 2) of dp=2 cp=2 get
    2 nodes x 2 tasks, run there (rank by rank, as slurm places block-wise), and the ZeRO-2 one
    matches the one-host run bit for bit."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "megaring.train", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.ranks_per_node=2",
           *[o for o in RUN if not o.startswith("parallel.zero_stage")], "parallel.zero_stage=1,2",
           f"hydra.sweep.dir={sweep_dir}"]
    env = clean_env(PATH=f"{BIN}:{cluster.env['PATH']}", SLURM_CONF=cluster.env["SLURM_CONF"], OMP_NUM_THREADS="1")
    watch = PlacementWatch(cluster)
    with open(tmp_path / "sweep.out", "w") as out:
        sweep = subprocess.Popen(cluster.on_node(cluster.node, cmd), cwd=ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 200
            while sweep.poll() is None:
                assert time.monotonic() < deadline, "the sweep still runs after 200 s"
                watch.look()
                time.sleep(0.2)
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
                sweep.wait(timeout=30)
    said = (tmp_path / "sweep.out").read_text(errors="replace")
    assert sweep.returncode == 0, f"{said[-6000:]}\n{cluster.logs()}"
    assert said.count("2 node(s) x 2 task(s)") == 2, said
    assert [watch.of(job) for job in sorted(watch.hosts)] == [BY_NODE] * 2, watch.hosts
    # Each run's directory is named by its overrides (megaring_run_name): ...,parallel.zero_stage=N,...
    runs = {d.parent.name.split("zero_stage=")[1][0]: d.parent for d in sweep_dir.glob("*/metrics.jsonl")}
    assert sorted(runs) == ["1", "2"], list(sweep_dir.iterdir())
    assert losses(runs["2"]) == reference
    assert [step for step, _, _ in losses(runs["1"])] == list(range(1, STEPS + 1))
