"""Training: config schema, DeepSpeed engine, step, checkpoints, metrics and the entry point."""

from megaring.train.config import TrainConfig, to_train_config
from megaring.train.trainer import train

__all__ = ["TrainConfig", "to_train_config", "train"]
