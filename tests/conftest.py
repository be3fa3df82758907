"""Shared fixtures: one local Ray per test session and the shared benchmark data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qcrd_ray.ray_utils import worker_runtime_env
from qcrd_ray.testing import free_port, patience

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


# Background writers qcrd starts in the test process: a lease's heartbeat, a run's log upload. One a test leaves
# running writes for the rest of the session, through storage functions that later tests patch (a fault test that
# takes the store down on "the next write" once met a leaked heartbeat's write instead of its own).
BACKGROUND_WRITERS = ("qcrd-lease", "qcrd-log-upload")


@pytest.fixture(autouse=True)
def no_background_writer_left():
    before = {t for t in threading.enumerate() if t.name in BACKGROUND_WRITERS}
    yield
    left = [t.name for t in threading.enumerate() if t.name in BACKGROUND_WRITERS and t not in before]
    assert not left, f"the test left {left} running: release the lease / call the log upload's upload()"


# How ray_session starts its local Ray. address="local": a cluster someone started with `ray start` must not
# capture the tests. A dashboard: the state API (fault tests find an actor's PID there; Ray Train's cleaner polls
# it) is served by it, and without one ray.util.state would answer from another local cluster's dashboard.
# worker_runtime_env: as every qcrd command's Ray, so that a test's Ray Train run survives the other Rays that
# tests start on this machine (a `ray start` head, the multi-node cluster).
LOCAL_RAY = dict(address="local", num_cpus=2, include_dashboard=True, log_to_driver=True, configure_logging=False,
                 runtime_env=worker_runtime_env())


# The tiny `qcrd run` the end-to-end tests share (tests/test_pipeline.py, test_console.py, test_reproducibility.py).
# Every step logged: the run has 8 steps, fewer than the default log_every.
SMALL = [
    "--set", "data.synthetic_train_size=64", "--set", "data.synthetic_eval_size=24",
    "--set", "teacher.k=3", "--set", "teacher.shard_rows=32",
    "--set", "train.rounds=2", "--set", "train.round_steps=4", "--set", "train.batch_size=4",
    "--set", "snapshots.j=1", "--set", "snapshots.max_new_tokens=24",
    "--set", "discriminator.pretrain_steps=10", "--set", "discriminator.refresh_steps=2",
    "--set", "student.max_target_len=64", "--set", "train.log_every=1",
]
SHARED_METHODS = ("dss", "qcrd")
# a bound, not a duration: ~1 min on a quiet 2-core machine, ~9 min under a load of 30
QCRD_RUN_TIMEOUT_S = patience(800.0)


def qcrd_run_args(out) -> list[str]:
    """The shared run's arguments (after the program name) into run folder ``out``."""
    return ["run", "--out", str(out), "--methods", ",".join(SHARED_METHODS), *SMALL]


def start_qcrd(args: list[str], stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """`qcrd ARGS` as a user (or a cluster job) runs it: its own process, session and process group, its own local
    Ray (RAY_ADDRESS dropped: a Ray this process started must not be joined), every worker's lines reaching the
    driver (and so its log). End it with :func:`kill_session`."""
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", "import sys; from qcrd_ray.cli import main; sys.exit(main())",
                             *args], stdout=stdout, stderr=stderr, text=True, env=env, start_new_session=True)


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_session(proc: subprocess.Popen, timeout_s: float = patience(60.0)) -> None:
    """SIGKILL the process group of ``proc`` (started by :func:`start_qcrd`: the driver, GCS, raylet, dashboard),
    then every process left in its session: Ray's workers each lead a process group of their own, and one that
    outlived its raylet for a moment could still write into the run folder. Waits until none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended, and everything in its group with it
        pass
    deadline = time.monotonic() + timeout_s
    while members := [pid for pid in _session_members(proc.pid) if pid != proc.pid]:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of session {proc.pid} survive SIGKILL: {members}")
        time.sleep(0.1)
    proc.wait(timeout=timeout_s)


@dataclass(frozen=True)
class SharedRun:
    out: Path  # the run folder
    returncode: int
    stdout: str
    stderr: str

    @property
    def printed(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory) -> SharedRun:
    """`qcrd run --out OUT --methods dss,qcrd SMALL`, run once per session as a subprocess (:func:`start_qcrd`),
    its stdout and stderr pipes captured. The end-to-end tests read it; none may change what it wrote, only add
    to it (an eval of another split, a rerun's log lines)."""
    out = tmp_path_factory.mktemp("shared-run") / "run"
    proc = start_qcrd(qcrd_run_args(out))
    try:
        stdout, stderr = proc.communicate(timeout=QCRD_RUN_TIMEOUT_S)
    finally:
        kill_session(proc)
    run = SharedRun(out, proc.returncode, stdout, stderr)
    assert run.returncode == 0, run.printed[-6000:]
    return run


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


@pytest.fixture(scope="session")
def multinode_cluster(request, s3_server):
    """A real multi-node Ray on this machine: a head with no CPUs (so no task runs on the driver's node) and two
    worker nodes of 1 CPU, each its own raylet; yields the ``ray.cluster_utils.Cluster``. Storage is the S3
    server (started first so every node inherits its environment). One process can be connected to one Ray: the
    session's local Ray, if running, is shut down first, and conftest runs the tests that use this fixture last,
    so it starts once per session (~30 s) and no test needs the local Ray after it."""
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

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # Ray gives a raylet a fixed 30 s to register; a loaded 2-core machine can miss it
        try:
            cluster = start()
            break
        except Exception:
            if attempt == 2:
                raise
    try:
        ray.init(address=cluster.address, log_to_driver=True, configure_logging=False,
                 runtime_env=worker_runtime_env())
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    check_the_package_is_this_checkouts()
    # pytest-timeout's per-test limit is a wait bound like any other: scaled by $QCRD_TEST_PATIENCE
    if config.option.timeout:
        config.option.timeout = patience(float(config.option.timeout))


def foreign_package_message(package_file: str, root: Path) -> str | None:
    """Why the suite would test another copy of qcrd_ray than the checkout it belongs to; None when it does not."""
    if Path(package_file).resolve().is_relative_to(root):
        return None
    return (f"qcrd_ray is imported from {Path(package_file).parent}, not from this checkout ({root}): the suite's "
            f"Ray workers and Serve replicas would run that copy beside this checkout's tests and serve/ "
            f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}). Unset PYTHONPATH, or install this checkout "
            f"(pip install -e .).")


def check_the_package_is_this_checkouts() -> None:
    """Refuse to start when Ray's workers would import another qcrd_ray than this checkout's: they import it as a
    fresh process in this environment does (PYTHONPATH first), not through pytest's sys.path."""
    found = subprocess.run([sys.executable, "-c", "import qcrd_ray; print(qcrd_ray.__file__)"], capture_output=True,
                           text=True, cwd=tempfile.gettempdir(), timeout=120)
    root = Path(__file__).resolve().parents[1]
    if found.returncode != 0:
        raise pytest.UsageError(f"qcrd_ray cannot be imported outside {root}, as Ray's workers import it: install "
                                f"this checkout (pip install -e .)\n{found.stderr[-2000:]}")
    message = foreign_package_message(found.stdout.strip(), root)
    if message:
        raise pytest.UsageError(message)


def pytest_collection_modifyitems(session, config, items):
    # the multi-node tests replace the session's local Ray while they run: keep them together, at the end
    items.sort(key=lambda item: "multinode_cluster" in getattr(item, "fixturenames", ()))


def pytest_sessionfinish(session, exitstatus):
    # A filtered run that selects nothing (`-k` on a fresh checkout) is not a failure of the project.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
