"""A real two-node Slurm cluster for the launcher tests, up once per session and always torn down.

DTRAIN_SLURM_TESTS=require (CI): fail when the cluster cannot run here; =skip: skip; unset: run when
possible (root + slurm-wlm installed, see .ci/slurm_setup.sh), else skip with the reason.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cluster import Cluster, unavailable_reason
from slurmjob import REPO


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the real Slurm test cluster (tests/slurm/cluster.py)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def slurm_cluster(request):
    mode = os.environ.get("DTRAIN_SLURM_TESTS", "")
    if mode == "skip":
        pytest.skip("DTRAIN_SLURM_TESTS=skip")
    reason = unavailable_reason()
    if reason:
        if mode == "require":
            pytest.fail(f"DTRAIN_SLURM_TESTS=require but the Slurm test cluster cannot run: {reason}")
        pytest.skip(reason)
    cluster = Cluster.acquire()
    # Torn down however the session ends: fixture finalizer; a SIGTERM (e.g. a CI timeout) interrupts
    # pytest like Ctrl-C, so the finalizers still run; atexit as the last resort.
    atexit.register(cluster.down)
    request.addfinalizer(cluster.release)
    request.addfinalizer(cluster.down)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    cluster.up()
    return cluster


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def job_env(slurm_cluster) -> dict:
    """Environment for sbatch: the cluster's SLURM_CONF and CPU settings."""
    return {
        **slurm_cluster.env(),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",        # two "nodes" share this machine's cores
        "PYTHONPATH": str(REPO),
    }

