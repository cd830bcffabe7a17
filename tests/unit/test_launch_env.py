"""Launcher environments: torchrun / deepspeed and slurm."""

from __future__ import annotations

import pytest

from megaring.distributed.env import first_host, read_launch_env


@pytest.mark.parametrize("nodelist,host", [
    ("gpu001", "gpu001"),
    ("gpu[007-009,012]", "gpu007"),
    ("gpu[12,3-4],cpu01", "gpu12"),
    ("a-b-1,a-b-2", "a-b-1"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_env():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
                           "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "h0", 1234)


def test_slurm_env():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "node[04-05]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "node04")
    assert env.launcher == "slurm" and env.master_port == 29500 + 4242


def test_no_launcher():
    env = read_launch_env({})
    assert env.world_size == 1 and env.launcher == "none"
