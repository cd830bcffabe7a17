"""Tiny training configs for the trainer's tests, composed from the shipped ``megaring/configs/`` tree."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megaring.config_dir import CONFIG_DIR
from megaring.train.config import TrainConfig, register_configs, to_train_config

TINY_RUN = ("model=tiny", "data=mock", "trainer.seq_len=64", "trainer.global_batch_size=4",
            "trainer.max_steps=3", "logging.wandb.mode=disabled", "logging.progress_bar=false",
            "parallel.timeout_s=60",
            # A large rate and a clip below the gradient norm: a wrong update or norm shows in the losses.
            "optim.lr=0.01", "optim.grad_clip=0.5")


def compose_cfg(*overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_train_config(compose("config", overrides=list(overrides)), overrides)


def launcher_params(*overrides: str) -> dict:
    """``hydra.launcher`` resolved in the job config these overrides make (as the slurm launcher does per job)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def make_cfg(*, dp: int = 1, cp: int = 1, tp: int = 1, zero_stage: int = 1, micro_batch_size: int = 1,
             extra: tuple[str, ...] = ()) -> TrainConfig:
    """The tiny 3-step run at this layout; stage 3 partitions every parameter (threshold 0)."""
    overrides = [*TINY_RUN, f"parallel.dp={dp}", f"parallel.cp={cp}", f"parallel.tp={tp}",
                 f"parallel.zero_stage={zero_stage}", f"trainer.micro_batch_size={micro_batch_size}", *extra]
    if zero_stage == 3:
        overrides.append("+parallel.deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    return compose_cfg(*overrides)
