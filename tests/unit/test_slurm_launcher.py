"""The slurm sweep launcher's pure parts: job sizes per layout, the partition check, squeue states."""

from __future__ import annotations

import os

import pytest

from megaring.ops.slurm_launcher import (
    Partition,
    SqueueWatcher,
    fit_problems,
    job_nodes,
    job_tasks_per_node,
    parse_sinfo,
    warning_problems,
)
from tests.helpers.train_cfg import launcher_params


@pytest.mark.parametrize("dp,cp,tp,per_node,nodes,tasks", [
    (1, 1, 1, 8, 1, 1), (1, 2, 1, 8, 1, 2), (4, 4, 1, 8, 2, 8), (2, 2, 2, 8, 1, 8), (3, 4, 1, 8, 2, 6),
])
def test_job_size_from_layout(dp, cp, tp, per_node, nodes, tasks):
    assert (job_nodes(dp, cp, tp, per_node), job_tasks_per_node(dp, cp, tp, per_node)) == (nodes, tasks)


def test_uneven_layout_is_an_error():
    with pytest.raises(ValueError, match="do not spread evenly over 2 nodes"):
        job_tasks_per_node(3, 3, 1, 8)


@pytest.mark.parametrize("overrides,expected", [
    (["parallel.cp=4", "parallel.dp=4"], (2, 8, 8, 8)),
    (["parallel.cp=2"], (1, 2, 2, 8)),
    (["parallel.tp=2", "parallel.cp=2", "hydra.launcher.ranks_per_node=2"], (2, 2, 2, 8)),
])
def test_gpu_profile_sizes_each_job(overrides, expected):
    p = launcher_params("hydra/launcher=slurm", *overrides)
    assert p["_target_"] == "hydra_plugins.megaring_slurm.launcher.MegaringSlurmLauncher"
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == expected


@pytest.mark.parametrize("cp,dp,zero_stage", [(1, 1, 1), (2, 1, 2), (2, 2, 1), (4, 1, 2)])
def test_cpu_profile_one_cpu_per_rank(cp, dp, zero_stage):
    """Every point of a cp x dp x zero_stage sweep, as the launcher resolves it per job."""
    p = launcher_params("hydra/launcher=slurm_cpu", f"parallel.cp={cp}", f"parallel.dp={dp}",
                        f"parallel.zero_stage={zero_stage}")
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (1, cp * dp, None, 1)
    assert p["partition"] is None


def test_parse_sinfo():
    text = "debug*|1|2|(null)\ngpu|4|64|gpu:h100:8(S:0-1)\ngpu|2|32+|gpu:8\n"
    assert parse_sinfo(text, None) == Partition("debug", 1, 2, 0)
    assert parse_sinfo(text, "gpu") == Partition("gpu", 6, 32, 8)
    with pytest.raises(RuntimeError, match="no partition nope"):
        parse_sinfo(text, "nope")


def test_fit_problems_name_the_job_and_every_shortfall():
    part = Partition("debug", 1, 2, 0)
    assert fit_problems("#0", {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1}, part) == []
    (msg,) = fit_problems("#1 (parallel.cp=4)", {"nodes": 2, "tasks_per_node": 4, "cpus_per_task": 1,
                                                 "gpus_per_node": 4}, part)
    assert msg.startswith("job #1 (parallel.cp=4) needs 2 nodes, the partition has 1, ")
    assert "4 tasks x 1 CPUs = 4 CPUs per node, its nodes have 2" in msg and "4 GPUs per node" in msg


@pytest.mark.parametrize("profile", ["slurm", "slurm_cpu"])
def test_a_time_limit_too_short_for_the_warning_is_refused_and_the_stock_profiles_pass(profile):
    """slurm warns once signal_delay_s + 60 s are left: a 10-minute job with the stock 600-s delay would
    be warned at its start and requeued without progress."""
    assert warning_problems("#0", launcher_params(f"hydra/launcher={profile}")) == []
    (msg,) = warning_problems("#1 (parallel.cp=2)", launcher_params(f"hydra/launcher={profile}",
                                                                    "hydra.launcher.timeout_min=10"))
    assert msg.startswith("job #1 (parallel.cp=2): hydra.launcher.signal_delay_s=600 is not 60 s shorter than "
                          "hydra.launcher.timeout_min=10 (600 s)"), msg
    assert "(e.g. 150)" in msg
    assert warning_problems("#2", {"timeout_min": 10, "signal_delay_s": 150}) == []


def test_squeue_watcher_reads_states_and_takes_unlisted_jobs_as_gone():
    watcher = SqueueWatcher(delay_s=60)
    for job in ("7", "8_0", "8_1", "9"):
        watcher.register_job(job)
    info = watcher.read_info(b"7|RUNNING|vm\n8_0|COMPLETED|vm\n8_1|PENDING|\n")
    assert {k: v["State"] for k, v in info.items()} == {"7": "RUNNING", "8_0": "COMPLETED", "8_1": "PENDING",
                                                        "9": "GONE"}


@pytest.mark.parametrize("profile", ["slurm", "slurm_cpu"])
def test_submission_asks_for_usr1_before_the_time_limit_and_submitit_handles_usr1(profile, tmp_path, monkeypatch):
    """The sbatch script submitit writes from the launcher's parameters: slurm's warning is USR1 (megaring
    saves on it; USR2 is its hang report), and submitit's requeue handler in the job listens to USR1."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    from megaring.ops.slurm_launcher import submitit_parameters

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit's executor looks for srun
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    params = launcher_params(f"hydra/launcher={profile}", "parallel.cp=2")
    params.pop("_target_")  # as LayoutSlurmLauncher.job_params hands them over
    executor = SlurmExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(**executor._convert_parameters(submitit_parameters(params)))
    sbatch = _make_sbatch_string(command="megaring-train", folder=tmp_path / "jobs", **executor.parameters)
    assert "#SBATCH --signal=USR1@600" in sbatch and "USR2" not in sbatch, sbatch
    setup = sbatch.split("# setup")[1].split("# command")[0]
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in setup, sbatch
    assert params["signal_delay_s"] > 120  # longer than trainer.preempt_grace_s: the save ends before the kill
