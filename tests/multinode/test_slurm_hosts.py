"""``sbatch --nodes=2 launch/slurm.sbatch`` on a slurm cluster of two test hosts (tests/helpers/slurm_hosts.py),
in both modes, at dp=2 cp=2 with two ranks per node; compared bit for bit with the spawner's run of the
same layout on one host.

Task mode places the ranks cyclically (``--distribution=cyclic``: ranks 0, 2 on node1, 1, 3 on node2),
so both cp rings cross the link at every ring step; torchrun mode places them by node (ranks 0, 1 on
node1), so the cp rings stay on a host and the dp (ZeRO) reductions cross. Each host's own name is
``127.0.1.1`` in its hosts file, as Debian installs it; ``MASTER_ADDR`` is the script's first host
of the allocation, node1.
"""

from __future__ import annotations

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
PLACEMENT = {"task": {0: "node1", 1: "node2", 2: "node1", 3: "node2"},
             "torchrun": {0: "node1", 1: "node1", 2: "node2", 3: "node2"}}


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


def job_ranks(job_id: str) -> dict[int, int]:
    """Global rank -> pid of this job's training processes now running (torchrun's workers have RANK,
    slurm's tasks SLURM_PROCID; torchrun itself, which names megaring.train too, is left out)."""
    ranks = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"megaring.train" not in cmdline or b"torch.distributed.run" in cmdline:
                continue
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:  # ended meanwhile
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode():
            ranks[int(env.get(b"RANK", env.get(b"SLURM_PROCID", b"-1")))] = int(proc.name)
    return ranks


def watch_job(cluster: HostsSlurmCluster, job_id: str, timeout_s: float) -> tuple[str, dict[int, str]]:
    """Wait for the job to end, meanwhile noting which host each rank runs on; (final state, rank -> host)."""
    deadline, placement = time.monotonic() + timeout_s, {}
    while (state := cluster.job_state(job_id)) in NOT_ENDED:
        assert time.monotonic() < deadline, f"slurm job {job_id} still {state} after {timeout_s} s"
        for rank, pid in job_ranks(job_id).items():
            placement.setdefault(rank, cluster.host_of(pid))
        time.sleep(0.2)
    return state, dict(sorted(placement.items()))


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
