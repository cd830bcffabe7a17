import pytest

from tests.helpers.slurm_cluster import SlurmCluster, unavailable_reason


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node slurm on this machine for the whole session (slurm and munge installed when missing,
    as root with apt-get); the tests that use it skip, with the reason, where it cannot start."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as err:
        pytest.skip(f"the one-node slurm test cluster did not start: {err}")
    yield cluster
    cluster.stop()
