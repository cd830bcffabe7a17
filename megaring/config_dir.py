"""Location of the Hydra configs shipped inside the package (``megaring/configs/``).

They are package data, so an installed wheel finds them as an editable checkout does; users add
their own with Hydra's ``--config-dir <dir>`` or replace them with ``--config-path <dir>``
(configs/README.md, docs/training.md).
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
