"""`ray job submit` path: a real head started with `ray start --head`, the pipeline submitted as a job; the
cluster's token authentication (cluster.yaml keeps it on, jobs/submit.py sends the token)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from jobs import submit as jobs_submit
from qcrd_ray.testing import free_port, patience

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# The whole pipeline at its smallest: the job, the cluster and the bucket are the point here, not the method (qcrd
# itself runs end to end in test_pipeline.py): `finetune` has no samplers and no discriminator, and one round of
# two steps of a one-layer student.
SMALL_RUN = [
    "--methods", "finetune",
    "--set", "data.synthetic_train_size=16", "--set", "data.synthetic_eval_size=8",
    "--set", "teacher.k=2", "--set", "teacher.shard_rows=16",
    "--set", "train.rounds=1", "--set", "train.round_steps=2", "--set", "train.batch_size=4",
    "--set", "train.num_workers=1",
    "--set", "student.max_target_len=32", "--set", "student.tiny_d_model=32", "--set", "student.tiny_d_ff=64",
    "--set", "student.tiny_layers=1", "--set", "student.tiny_vocab_size=400",
]
POLL_S = 0.2  # how often a test asks a job's status (jobs_submit.wait's default, 1 s, is for people)



@contextlib.contextmanager
def _head(env: dict[str, str]):
    """A separate local cluster, started the way a user starts one, from this environment's `ray`; yields its job
    server's address. `--block` keeps the head's processes in one process group that this test owns, so the
    teardown stops exactly them (`ray stop` would stop every Ray on the machine)."""
    # every port of our own: the agent's default (52365) is taken by any other head on this machine
    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env,
           # On SIGTERM, `ray start --block` first drains its node, for up to this long (default 30 s): the wait
           # Kubernetes needs for Serve's proxies. These heads serve nothing: stop at once.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(Path(temp_dir) / "start.log", "wb") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        if head.poll() is not None:  # it stopped on its own (a process of the head died): say why, for the report
            print(f"the head had stopped (exit {head.returncode}):\n"
                  + (Path(temp_dir) / "start.log").read_text(errors="replace")[-6000:], file=sys.stderr)
        # SIGTERM to `ray start` alone: it stops its processes in order, the raylet (and with it the jobs' workers)
        # before the GCS. (SIGTERM to the whole group killed the GCS first, and the raylet and `ray start`, still
        # trying to reach it, had to be killed after a timeout.) What it leaves, the dashboard's forked modules, is
        # killed with the group; nothing of the head is kept.
        head.terminate()
        try:
            head.wait(timeout=patience(30))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=patience(60))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A `ray start` head that reaches the S3 server: its processes inherit the AWS_* variables s3_server set (on
    a real cluster, the nodes' instance role)."""
    with _head({"RAY_AUTH_MODE": "disabled"}) as address:
        yield address


def test_pipeline_job_writes_the_run_to_s3(ray_head, s3_server):
    """The cluster way: a job on a real head with its --out a bucket URI; the whole run lands in the bucket, the
    run's lease is gone with the job, and the job's log ends with the serve command for that URI."""
    from qcrd_ray import lease, storage

    uri = storage.join(s3_server, "job-run")
    job_id = jobs_submit.submit(
        ray_head, [sys.executable, "-m", "jobs.pipeline", "--out", uri, *SMALL_RUN], working_dir=str(ROOT),
        env={"TOKENIZERS_PARALLELISM": "false"},
    )
    status = jobs_submit.wait(ray_head, job_id, timeout_s=patience(600), poll_s=POLL_S)
    logs = jobs_submit._client(ray_head).get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert jobs_submit.exit_code(status) == 0
    metrics = json.loads(storage.read_text(storage.join(uri, "finetune", "eval", "test-predict", "metrics.json")))
    assert metrics["n"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    assert storage.exists(storage.join(uri, "report.md"))
    assert storage.is_complete(storage.join(uri, "finetune", "model"))
    assert storage.is_file(storage.join(uri, "logs", "qcrd.log"))  # uploaded from the job's node
    assert not storage.exists(storage.join(uri, lease.LEASE_FILE))
    assert "report:" in logs and f"qcrd serve --model {uri}/finetune" in logs


def test_failed_job_gives_a_nonzero_exit_code(ray_head, tmp_path):
    job_id = jobs_submit.submit(ray_head, [sys.executable, "-m", "jobs.pipeline", "--set", "train.rounds=0"],
                                working_dir=str(ROOT))
    status = jobs_submit.wait(ray_head, job_id, timeout_s=patience(300), poll_s=POLL_S)
    assert status == "FAILED"
    assert jobs_submit.exit_code(status) == 1
    assert "train.rounds" in jobs_submit._client(ray_head).get_job_logs(job_id)


# --------------------------------------------------------------------------------------------------------------
# token authentication


def test_cluster_yaml_keeps_token_auth_on_and_the_dashboard_on_loopback():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command and "disabled" not in command, command
        assert "0.0.0.0" not in command, command
    [head] = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head.split()
    assert "RAY_AUTH_MODE=disabled" not in (ROOT / "cluster.yaml").read_text()
    # every node gets the token at the path Ray reads by default
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_cluster_yaml_shows_both_shared_storages(tmp_path):
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    # S3 through instance roles: every node has one, so no node holds keys
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "qcrd-ray-head"}
    for name, node in types.items():
        assert "Name" in node["node_config"]["IamInstanceProfile"], name
    # EFS/NFS: the mount command runs as shipped (EFS unset: nothing is mounted, nothing is called) ...
    [mount] = cluster["initialization_commands"]
    calls = tmp_path / "calls"
    for tool in ("sudo", "mount", "mountpoint"):
        (tmp_path / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    assert subprocess.run(["bash", "-c", mount], env=env).returncode == 0 and not calls.exists()
    # ... and with EFS set, mounts it with NFS 4.1 at /mnt/efs
    set_efs = mount.replace("EFS=;", "EFS=fs-1.efs.us-west-2.amazonaws.com;", 1)
    (tmp_path / "mountpoint").write_text("#!/bin/sh\nexit 1\n")  # not mounted yet
    assert subprocess.run(["bash", "-c", set_efs], env=env).returncode == 0
    lines = calls.read_text().splitlines()
    assert "sudo mkdir -p /mnt/efs" in lines
    assert any(line.startswith("sudo mount -t nfs4 -o nfsvers=4.1") and
               line.endswith("fs-1.efs.us-west-2.amazonaws.com:/ /mnt/efs") for line in lines), lines


def test_the_token_is_looked_up_where_ray_looks(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert jobs_submit.auth_token({}, home) is None and jobs_submit.auth_headers(None) == {}
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs_submit.auth_token({}, home) == "from-home"
    (tmp_path / "tok").write_text(" from-path \n")
    assert jobs_submit.auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home) == "from-path"
    assert jobs_submit.auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")},
                                  home) == "from-env"
    assert jobs_submit.auth_headers("from-env") == {"Authorization": "Bearer from-env"}
    with pytest.raises(jobs_submit.TokenError, match="RAY_AUTH_TOKEN_PATH=.*missing: cannot read"):
        jobs_submit.auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(jobs_submit.TokenError, match="empty"):
        jobs_submit.auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home)


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head with token auth on, its token at ~/.ray/auth_token of the head's HOME (as cluster.yaml mounts it)."""
    home, token = tmp_path_factory.mktemp("head-home"), secrets.token_hex(16)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token + "\n")
    with _head({"RAY_AUTH_MODE": "token", "HOME": str(home)}) as address:
        yield address, home, token


def test_submit_sends_the_token_a_token_cluster_requires(token_head, tmp_path, monkeypatch, capsys):
    from ray.exceptions import AuthenticationError

    address, head_home, token = token_head
    work = tmp_path / "job"
    work.mkdir()
    (work / "hello.py").write_text("print('hello from the job')\n")
    entrypoint = [sys.executable, "hello.py"]
    # this process's own RAY_AUTH_MODE stays as the tests set it: the token must travel anyway
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(AuthenticationError, match="Missing authentication token"):
        jobs_submit.submit(address, entrypoint, working_dir=str(work))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-" + token)
    assert jobs_submit.main(["--address", address, "status", "any"]) == 2
    err = capsys.readouterr().err
    assert "Invalid authentication token" in err and "~/.ray/auth_token" in err and "ray get-auth-token" in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    job_id = jobs_submit.submit(address, entrypoint, working_dir=str(work))
    assert jobs_submit.wait(address, job_id, timeout_s=patience(120), poll_s=POLL_S) == "SUCCEEDED"
    assert "hello from the job" in jobs_submit._client(address).get_job_logs(job_id)

    # the CLI end to end, the token from ~/.ray/auth_token (where `ray get-auth-token --generate` puts it)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(head_home))
    assert jobs_submit.main(["--address", address, "submit", "--working-dir", str(work), "--", *entrypoint]) == 0
    assert "hello from the job" in capsys.readouterr().out
