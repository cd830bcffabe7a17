"""The wandb run of rank 0: resolved config, mesh, group and tags; offline by default, no key needed.

All of wandb's directories point into the run directory. The run id is kept there too, so a
resumed training continues the same wandb run. Runs that differ only in layout share a group
(:func:`megaring.train.config.experiment_id`) and carry layout tags, so a sweep over layouts reads
as one comparable set.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from megaring.train.config import TrainConfig, config_dict, experiment_id


def mesh_record(cfg: TrainConfig) -> dict[str, int]:
    """The mesh sizes as wandb's config and ``metrics.jsonl`` record them."""
    p = cfg.parallel
    return {"dp": p.dp, "cp": p.cp, "ulysses": p.ulysses, "tp": p.tp}


def layout_tags(cfg: TrainConfig) -> list[str]:
    p = cfg.parallel
    tags = [f"dp{p.dp}", f"cp{p.cp}", f"ulysses{p.ulysses}", f"tp{p.tp}", f"zero{p.zero_stage}",
            f"model-{cfg.model.name}"]
    if p.sequence_parallel:
        tags.append("sp")
    return tags + list(cfg.logging.wandb.tags)


class Tracker:
    """wandb on rank 0 (``mode=disabled`` or another rank: every call does nothing)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, *, rank: int, world_size: int, active: bool = True):
        """``active=False``: nothing to log (a finished run re-run), so no wandb run (and no empty
        ``offline-run-*`` directory)."""
        self.run = None
        w = cfg.logging.wandb
        if rank != 0 or w.mode == "disabled" or not active:
            return
        import wandb

        wandb_dir = Path(w.dir) if w.dir else run_dir
        for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            os.environ.setdefault(var, str(wandb_dir / "wandb" / sub))
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        config = config_dict(cfg) | {"mesh": mesh_record(cfg), "world_size": world_size}
        self.run = wandb.init(
            project=w.project, entity=w.entity, group=w.group or f"exp-{experiment_id(cfg)}",
            name=w.name or run_dir.name, tags=layout_tags(cfg), config=config, dir=str(wandb_dir),
            mode=w.mode, id=run_id, resume="allow", settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if k != "step" and v is not None},
                         step=metrics["step"])

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
