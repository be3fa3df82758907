"""Shared fixtures: one local Ray per test session and the shared benchmark data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Train's health check otherwise makes every report block ~2 s; Ray must not ask for a token locally.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(os.environ.get("QCRD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The four paper benchmarks in DSS layout; tests that need them skip where they are absent."""
    if not (SHARED_DATA / "svamp").is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (set QCRD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one per test costs seconds each)."""
    import ray

    if not ray.is_initialized():
        # address="local": a cluster someone started with `ray start` must not capture the tests
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    # A filtered run that selects nothing (`-k` on a fresh checkout) is not a failure of the project.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
