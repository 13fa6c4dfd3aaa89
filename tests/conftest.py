"""Suite-wide hygiene."""

import os

import pytest


@pytest.fixture(autouse=True)
def _no_environment_leaks():
    """Each test sees the environment the suite started with.

    NOTE: an in-process world of one (`parallel.init_distributed`) exports RANK, WORLD_SIZE and
    MASTER_PORT, as torchrun would. Left in pytest's environment they reach every later subprocess:
    a converter then joins "its" world on the port this process still holds (EADDRINUSE), and an
    sbatch job skips the SLURM_* mapping because RANK is already set.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
