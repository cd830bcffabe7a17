"""``hydra/launcher=slurm`` / ``slurm_cpu``: Hydra instantiates launchers only from ``hydra_plugins``.

The launcher itself (job sizes per layout, the partition check) is
:class:`megaring.ops.slurm_launcher.LayoutSlurmLauncher`.
"""

from megaring.ops.slurm_launcher import LayoutSlurmLauncher


class MegaringSlurmLauncher(LayoutSlurmLauncher):
    """The slurm sweep launcher under the name Hydra accepts (megaring/configs/hydra/launcher/slurm.yaml)."""
