"""Hydra sweeps on slurm, each job sized by its own layout (the owner of the submitit boundary).

hydra-submitit-launcher resolves its parameters once, from the sweep's base config, so every job
of ``parallel.cp=1,2,4`` would ask for the same number of tasks. :class:`LayoutSlurmLauncher`
resolves ``hydra.launcher`` again in each job's own config, where
``megaring/configs/hydra/launcher/slurm.yaml`` computes the size from the layout (the resolvers below):

    ranks = dp * cp * tp,  nodes = ceil(ranks / ranks_per_node),  tasks_per_node = ranks / nodes

Jobs with equal parameters go in one job array. Before anything is submitted, every job is checked
against the partition (``sinfo``: nodes, CPUs and GPUs per node); one that could never start fails
the sweep with a message instead of pending forever (``check_fit: false`` skips the check).
Clusters without accounting cannot answer ``sacct``, which submitit polls; there the jobs are
watched with ``squeue`` (:class:`SqueueWatcher`).

Hydra instantiates launchers only from the ``hydra_plugins`` package: the name in the configs is
``hydra_plugins.megaring_slurm.launcher.MegaringSlurmLauncher``, a subclass with nothing added.
Preemption and time limits: the configs move submitit's warning signal from USR2 (megaring-train's
hang report) to USR1 (``--signal=USR1@signal_delay_s`` and ``SUBMITIT_PREEMPT_SIGNAL=USR1`` in the
job); megaring-train saves on it, then calls submitit's handler, which requeues the job (the
plugin's ``checkpoint``, at most ``max_num_timeout`` times after time limits).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher, log
from omegaconf import OmegaConf
from submitit.slurm.slurm import SlurmExecutor, SlurmInfoWatcher, SlurmJob

OWN_KEYS = ("ranks_per_node", "check_fit")  # this launcher's, not submitit's
INIT_KEYS = ("submitit_folder", "max_num_timeout")  # the executor's constructor takes these


@dataclass
class MegaringSlurmConf(SlurmQueueConf):
    """The plugin's slurm schema plus the node size the layout is divided by."""

    _target_: str = "hydra_plugins.megaring_slurm.launcher.MegaringSlurmLauncher"
    ranks_per_node: int = 8  # ranks (GPUs, or CPUs in slurm_cpu) one node of the partition holds
    check_fit: bool = True  # refuse jobs the partition cannot hold, before submitting any


def world_size(dp: int, cp: int, tp: int) -> int:
    return int(dp) * int(cp) * int(tp)


def job_nodes(dp: int, cp: int, tp: int, ranks_per_node: int) -> int:
    """Nodes for one task per rank: ``ceil(dp * cp * tp / ranks_per_node)``."""
    return math.ceil(world_size(dp, cp, tp) / int(ranks_per_node))


def job_tasks_per_node(dp: int, cp: int, tp: int, ranks_per_node: int) -> int:
    """Tasks on each node: the ranks spread evenly (a world size that does not divide is an error)."""
    ranks, nodes = world_size(dp, cp, tp), job_nodes(dp, cp, tp, ranks_per_node)
    if ranks % nodes:
        raise ValueError(f"dp*cp*tp = {ranks} ranks do not spread evenly over {nodes} nodes of "
                         f"{ranks_per_node} (hydra.launcher.ranks_per_node)")
    return ranks // nodes


RESOLVERS = {"megaring_world_size": world_size, "megaring_nodes": job_nodes,
             "megaring_tasks_per_node": job_tasks_per_node}


def register_launcher() -> None:
    """The resolvers, and ``hydra/launcher=megaring_slurm`` (the base of slurm.yaml and slurm_cpu.yaml)."""
    from hydra.core.config_store import ConfigStore

    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    ConfigStore.instance().store(group="hydra/launcher", name="megaring_slurm", node=MegaringSlurmConf,
                                 provider="megaring")


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int


def read_partition(name: str | None) -> Partition:
    """Size of the partition (the default one for None) from ``sinfo``."""
    cmd = ["sinfo", "--noheader", "--format=%P|%D|%c|%G"] + ([f"--partition={name}"] if name else [])
    return parse_sinfo(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout, name)


def parse_sinfo(text: str, name: str | None) -> Partition:
    """``%P|%D|%c|%G`` lines (one per node kind); the smallest node counts. None: the default (``*``)."""
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if (r[0].endswith("*") if name is None else r[0].rstrip("*") == name)]
    if not rows:
        raise RuntimeError(f"sinfo lists no partition {name or '(default)'}: set hydra.launcher.partition")
    nodes = sum(int(r[1]) for r in rows)
    cpus = min(int(r[2].rstrip("+")) for r in rows)
    gpus = min(sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", r[3])) for r in rows)
    return Partition(rows[0][0].rstrip("*"), nodes, cpus, gpus)


def fit_problems(job: str, params: dict[str, Any], part: Partition) -> list[str]:
    """Why a job with these submitit parameters can never start in this partition (empty: it can)."""
    nodes, tasks = params.get("nodes") or 1, params.get("tasks_per_node") or 1
    cpus = tasks * (params.get("cpus_per_task") or 1)
    gpus = params.get("gpus_per_node") or 0
    out = []
    if nodes > part.nodes:
        out.append(f"{nodes} nodes, the partition has {part.nodes}")
    if cpus > part.cpus_per_node:
        out.append(f"{tasks} tasks x {params.get('cpus_per_task') or 1} CPUs = {cpus} CPUs per node, "
                   f"its nodes have {part.cpus_per_node}")
    if gpus > part.gpus_per_node:
        out.append(f"{gpus} GPUs per node, its nodes have {part.gpus_per_node}")
    return [f"job {job} needs {', '.join(out)} (partition {part.name})"] if out else []


def warning_problems(job: str, params: dict[str, Any]) -> list[str]:
    """Why slurm would warn this job (``--signal=USR1@signal_delay_s``) at its start: slurmctld warns
    once at most ``signal_delay_s`` + 60 s are left, so a limit that short gets the warning at once,
    and submitit would requeue the job ``max_num_timeout`` times without progress (empty: it would not)."""
    delay, limit_min = params.get("signal_delay_s"), params.get("timeout_min")
    if delay is None or not limit_min or delay + 60 < limit_min * 60:
        return []
    return [f"job {job}: hydra.launcher.signal_delay_s={delay} is not 60 s shorter than hydra.launcher.timeout_min="
            f"{limit_min} ({limit_min * 60} s), so slurm would warn it at its start and every requeued attempt "
            f"again; set signal_delay_s to about a quarter of the limit (e.g. {limit_min * 15}) or a longer "
            "timeout_min"]


class SqueueWatcher(SlurmInfoWatcher):
    """Job states from ``squeue``, for clusters without accounting (``sacct`` fails there).

    A finished job stays listed for the cluster's MinJobAge (300 s by default); one no longer listed
    has ended (state ``GONE``), and submitit then reads its result file or reports it missing.
    """

    def _make_command(self) -> list[str] | None:
        if not self._registered - self._finished:
            return None
        return ["squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info("JobID|State|NodeList\n" + text)
        for job_id in self._registered - self._finished:
            info.setdefault(job_id, {"JobID": job_id, "State": "GONE", "NodeList": ""})
        return info


class SqueueJob(SlurmJob):
    watcher = SqueueWatcher(delay_s=60)


class SqueueExecutor(SlurmExecutor):
    job_class = SqueueJob


def accounting_enabled() -> bool:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out, re.MULTILINE)
    return match is None or match.group(1) != "accounting_storage/none"


@dataclass(frozen=True)
class SweepJob:
    index: int
    overrides: list[str]
    params: dict[str, Any]  # hydra.launcher resolved in this job's config, less _target_

    def describe(self) -> str:
        return f"#{self.index} ({' '.join(filter_overrides(self.overrides))})"


class LayoutSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's slurm launcher, sizing and checking every job from its own config.

    ``launch`` resolves each job's parameters, checks them all against their partitions, then submits
    one job array per distinct set of parameters; on the cluster each task runs the plugin's
    ``__call__`` (the Hydra job), and ``checkpoint`` (submitit's requeue on preemption) is the plugin's.
    """

    def job_params(self, overrides: list[str]) -> dict[str, Any]:
        """``hydra.launcher`` resolved in this job's config: its submitit parameters and ours."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        params.pop("_target_", None)
        return params

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        jobs = [SweepJob(idx, list(o), self.job_params(o)) for idx, o in enumerate(job_overrides, initial_job_idx)]
        for job in jobs:
            log.info(f"\t{job.describe()}: {job.params['nodes']} node(s) x {job.params['tasks_per_node']} task(s)")
        self.check_warning(jobs)
        self.check_fit(jobs)
        groups: dict[str, list[SweepJob]] = {}
        for job in jobs:
            groups.setdefault(json.dumps(job.params, sort_keys=True, default=str), []).append(job)
        submitted = {}
        for group in groups.values():
            executor = self.executor(group[0].params)
            args = [(j.overrides, "hydra.sweep.dir", j.index, f"job_id_for_{j.index}", Singleton.get_state())
                    for j in group]
            for job, array_job in zip(group, executor.map_array(self, *zip(*args))):
                # submitit makes array jobs SlurmJob whatever the executor's job_class: watch them with ours
                submitted[job.index] = executor.job_class(folder=executor.folder, job_id=array_job.job_id,
                                                          tasks=list(range(array_job.num_tasks)))
        return [submitted[job.index].results()[0] for job in jobs]

    def check_warning(self, jobs: list[SweepJob]) -> None:
        """Exit (code 2, one line per job) before submitting when slurm would warn a job at its start."""
        problems = [p for job in jobs for p in warning_problems(job.describe(), job.params)]
        if problems:
            print("megaring-train: nothing submitted, these jobs would be warned of their time limit at their "
                  "start:\n  - " + "\n  - ".join(problems), file=sys.stderr)
            raise SystemExit(2)

    def check_fit(self, jobs: list[SweepJob]) -> None:
        """Exit (code 2, one line per job) before submitting when a job can never start."""
        partitions: dict[str | None, Partition] = {}
        problems = []
        for job in (j for j in jobs if j.params["check_fit"]):
            name = job.params.get("partition")
            if name not in partitions:
                partitions[name] = read_partition(name)
            problems += fit_problems(job.describe(), job.params, partitions[name])
        if problems:  # the user's to fix, like a ConfigError: the message and exit code 2, no traceback
            print("megaring-train: nothing submitted, these jobs cannot start in their partition (set "
                  "hydra.launcher.partition / ranks_per_node, or a smaller layout):\n  - " + "\n  - ".join(problems),
                  file=sys.stderr)
            raise SystemExit(2)

    def executor(self, params: dict[str, Any]) -> SlurmExecutor:
        kind = SlurmExecutor if accounting_enabled() else SqueueExecutor
        executor = kind(folder=params["submitit_folder"], max_num_timeout=params["max_num_timeout"])
        executor.update_parameters(**executor._convert_parameters(submitit_parameters(params)))
        return executor


def submitit_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """What goes to submitit's ``update_parameters`` of a job's resolved ``hydra.launcher``."""
    return {k: v for k, v in params.items() if k not in (*INIT_KEYS, *OWN_KEYS) and v is not None}
