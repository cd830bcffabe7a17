"""Location of the Hydra configs shipped at the repository root (``configs/``)."""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
