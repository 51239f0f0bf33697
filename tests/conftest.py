import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting it costs seconds)."""
    from pipeline.executor import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield
    shutdown_ray()
