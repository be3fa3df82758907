"""Shared fixtures: one local Ray per test session and the shared benchmark data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcrd_ray.ray_utils import worker_runtime_env
from qcrd_ray.testing import free_port

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


# how ray_session starts its local Ray (address="local": a cluster someone started with `ray start` must not
# capture the tests); multinode_cluster restarts it the same way after it is done
# with its dashboard: the state API (fault tests find an actor's PID there; Ray Train's cleaner polls it) is
# served by it, and without one ray.util.state would answer from another local cluster's dashboard
# worker_runtime_env: as every qcrd command's Ray, so that a test's Ray Train run survives the other Rays that
# tests start on this machine (a `ray start` head, the multi-node cluster)
LOCAL_RAY = dict(address="local", num_cpus=2, include_dashboard=True, log_to_driver=True, configure_logging=False,
                 runtime_env=worker_runtime_env())


def _uses(session, fixture: str) -> bool:
    return any(fixture in getattr(item, "fixturenames", ()) for item in session.items)


@pytest.fixture(scope="session")
def ray_session(request):
    """One local Ray for the whole test session (starting one per test costs seconds each).

    Ray workers inherit the driver's environment once, at ray.init: when any selected test uses the S3 server,
    the server starts (and sets its AWS_* variables) BEFORE Ray, so workers reach the bucket too."""
    import ray

    if _uses(request.session, "s3_server"):
        request.getfixturevalue("s3_server")
    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray
    ray.shutdown()



@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's ThreadedMotoServer) on 127.0.0.1 with bucket ``qcrd-test``; yields the
    bucket's URI ``s3://qcrd-test``. Sets AWS_ENDPOINT_URL(_S3), dummy keys and AWS_DEFAULT_REGION for the whole
    session; a Ray started afterwards (ray_session, multinode_cluster) hands them to its workers. A Ray already
    running without them cannot get them, so that case fails here instead of later in a worker."""
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need the dev extra (moto[server])")
    import ray

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential probe of a cloud metadata service
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        if ray.is_initialized():
            raise RuntimeError("s3_server must start before Ray: request it before ray_session/multinode_cluster")
        import boto3

        boto3.client("s3").create_bucket(Bucket="qcrd-test")
        try:
            yield "s3://qcrd-test"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def multinode_cluster(request, s3_server):
    """A real multi-node Ray on this machine: a head with no CPUs (so no task runs on the driver's node) and two
    worker nodes of 1 CPU, each its own raylet; yields the ``ray.cluster_utils.Cluster``. Storage is the S3
    server (started first so every node inherits its environment). One process can be connected to one Ray: the
    session's local Ray, if running, is shut down first and started again afterwards, and conftest runs the
    tests that use this fixture last so that happens at most once."""
    import ray
    from ray.cluster_utils import Cluster

    def start() -> Cluster:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
        except Exception:
            cluster.shutdown()
            raise
        return cluster

    had_local = ray.is_initialized()
    if had_local:
        ray.shutdown()
    try:
        cluster = start()
    except Exception:  # Ray gives a raylet a fixed 30 s to register; a loaded 2-core machine can miss it once
        cluster = start()
    try:
        ray.init(address=cluster.address, log_to_driver=True, configure_logging=False,
                 runtime_env=worker_runtime_env())
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            ray.init(**LOCAL_RAY)


def pytest_collection_modifyitems(session, config, items):
    # the multi-node tests replace the session's local Ray while they run: keep them together, at the end
    items.sort(key=lambda item: "multinode_cluster" in getattr(item, "fixturenames", ()))


def pytest_sessionfinish(session, exitstatus):
    # A filtered run that selects nothing (`-k` on a fresh checkout) is not a failure of the project.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
