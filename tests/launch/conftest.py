import sys

import pytest

from tests.launch.slurm_cluster import SlurmCluster, ensure_installed


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM cluster (installed with apt-get when missing)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the SLURM daemons run on Linux only")
    ensure_installed()
    with SlurmCluster() as cluster:
        yield cluster
