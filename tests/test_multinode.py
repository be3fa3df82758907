"""The cluster path end to end: a real multi-node Ray (head with no CPUs + two 1-CPU worker nodes) and a real S3
server on loopback. `qcrd run --out s3://…` from a scratch directory loses the worker node of a train worker
mid-training and goes on on the other node, is then interrupted for real (its driver SIGKILLed once a complete
checkpoint is in the bucket) and resumed by the same command; every artifact in the bucket and nothing in
the scratch directory; then a second driver from another directory evaluates, reports and serves the run from its
URI alone. A `qcrd teach` to S3 loses the worker node of a teacher actor mid-batch and keeps every example exactly
once. A relative --out on this cluster is refused before anything is written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from qcrd_ray import storage
from qcrd_ray.testing import HoldingTeacher, free_port, patience
from qcrd_ray.train import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
QCRD = str(Path(sys.executable).parent / "qcrd")
ROUNDS, ROUND_STEPS, EVAL_SIZE = 3, 3, 12
# tiny, and fractional CPUs: two train workers, the sampler and the teacher pool share two 1-CPU nodes. Every step
# logged: the run has 9 steps, fewer than the default log_every, and without step lines the driver's display stays
# at "starting 3 rounds" until training ends (which reads like a hang)
SMALL_RUN = [
    "--set", "data.synthetic_train_size=32", "--set", f"data.synthetic_eval_size={EVAL_SIZE}",
    "--set", "teacher.k=3", "--set", "teacher.shard_rows=16", "--set", "teacher.num_cpus=0.25",
    "--set", "teacher.max_actors=1",
    "--set", f"train.rounds={ROUNDS}", "--set", f"train.round_steps={ROUND_STEPS}", "--set", "train.num_workers=2",
    "--set", "train.num_cpus_per_worker=0.25", "--set", "train.log_every=1",
    "--set", "snapshots.j=1", "--set", "snapshots.max_new_tokens=16", "--set", "snapshots.sampler_num_cpus=0.25",
    "--set", "discriminator.pretrain_steps=5", "--set", "discriminator.refresh_steps=2",
    "--set", "student.max_target_len=48", "--set", "serve.num_cpus=0.25",
]
WAIT_S = patience(600.0)  # a bound, not a duration: a loaded 2-core machine starts Ray workers slowly


def _env(cluster) -> dict[str, str]:
    # what `ray job submit` gives a job's driver: the cluster's address; the S3 variables come from s3_server
    return {**os.environ, "RAY_ADDRESS": cluster.address, "TOKENIZERS_PARALLELISM": "false"}


def _qcrd(cluster, cwd: Path, *args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([QCRD, *args], cwd=cwd, env=_env(cluster), capture_output=True, text=True,
                          timeout=timeout)


def _live_actors(wanted) -> list[dict]:
    """The GCS's entries of the live actors whose class name ``wanted(name)`` accepts."""
    from ray._private import state

    return [a for a in state.actors().values() if a["State"] == "ALIVE" and wanted(a["ActorClassName"])]


def _node_of_a_train_worker(cluster):
    """The worker node (a ``ray._private.node.Node`` of ``cluster``) that runs a live train worker, or None.
    Read from the GCS actor table: this cluster has no dashboard, so no state API."""
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    return next((nodes[a["Address"]["NodeID"]] for a in _live_actors(lambda name: name == "RayTrainWorker")
                 if a["Address"]["NodeID"] in nodes), None)


def _files(uri: str) -> list[str]:
    """Every file under ``uri``, relative to it."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def run_uri(multinode_cluster, s3_server, tmp_path_factory):
    """`qcrd run --out s3://…` from a scratch directory: the worker node of a train worker removed mid-training
    (Ray Train restarts the group on the other node, within the call), the driver killed once a checkpoint made
    after that is in the bucket, then the same command rerun to completion (a replacement node added first).
    Yields (run URI, scratch directory, figures of the interruption)."""
    from ray._private import state

    uri = storage.join(s3_server, "multinode", "run")
    scratch = tmp_path_factory.mktemp("scratch")
    command = [QCRD, "run", "--out", uri, *SMALL_RUN]
    checkpoints = storage.join(uri, "qcrd", "train", "checkpoints")
    console_file = scratch.parent / "first-console.txt"  # beside the scratch directory, which must stay empty
    with open(console_file, "w") as console_out:
        first = subprocess.Popen(command, cwd=scratch, env=_env(multinode_cluster), stdout=console_out,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + WAIT_S
    lost = None
    try:
        # a worker node lost mid-training: the one that holds a train worker, gone without a goodbye
        while lost is None and first.poll() is None and time.monotonic() < deadline:
            lost = _node_of_a_train_worker(multinode_cluster)
            time.sleep(0.2)
        if lost is not None:
            multinode_cluster.remove_node(lost, allow_graceful=False)
        before = ckpt.latest(checkpoints)
        # killed once a whole checkpoint made after the loss is in the bucket (every file its marker lists, at its
        # size), not at the first file of one: resuming from a half-uploaded checkpoint is a different test (the
        # marker's). The group that lost a rank cannot make one (its all-reduce needs both): the restarted one did
        while ckpt.latest(checkpoints) in (None, before) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        ended = first.poll()
        started_workers = sum(a["ActorClassName"] == "RayTrainWorker" for a in state.actors().values())
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it ended by itself: the assertions below say how)
            os.killpg(first.pid, signal.SIGKILL)  # the driver and anything it spawned: no chance to clean up
        first.wait(timeout=patience(60))
        if lost is not None:  # a replacement, as an autoscaler would bring: the rerun and later tests have two
            multinode_cluster.add_node(num_cpus=1)
            multinode_cluster.wait_for_nodes()
    printed = console_file.read_text()
    assert lost is not None, f"no train worker seen on a worker node: {printed[-4000:]}"
    assert ended is None, f"the first run ended before a checkpoint: {printed[-4000:]}"
    killed_at = ckpt.latest(checkpoints)
    assert killed_at, f"no complete checkpoint in the bucket: {printed[-4000:]}"
    figures = {"model_complete_at_kill": storage.is_complete(storage.join(uri, "qcrd", "model")),
               "rounds_at_kill": ckpt.load_state(killed_at).completed_rounds, "first_console": printed,
               "started_workers": started_workers}
    started = time.monotonic()
    second = _qcrd(multinode_cluster, scratch, *command[1:])
    figures["resume_s"] = time.monotonic() - started
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    yield uri, scratch, figures


def test_a_run_on_s3_keeps_everything_in_the_bucket_and_resumes_after_its_driver_is_killed(run_uri):
    uri, scratch, figures = run_uri
    # the kill interrupted training after a whole checkpoint, it did not follow it. (That the resumed weights, the
    # student's and D's, equal an uninterrupted run's to the bit is tested in tests/test_train.py, for a worker
    # restarted within the call and for a rerun after train.max_failures is spent: a second multi-node run here
    # would add a minute for the S3 round trip alone, which the byte-exact checkpoint listing already covers.)
    assert not figures["model_complete_at_kill"] and 1 <= figures["rounds_at_kill"] < ROUNDS
    # the node holding a train worker was removed mid-training: Ray Train restarted the worker group on the
    # remaining node (two 0.25-CPU workers fit on one), within the same driver. The console names the dead node in
    # Ray's line, not in our notice: Ray Train calls a UserCallback's after_exception only for errors its poll of
    # the workers returns, and a lost node ends the group another way
    assert figures["started_workers"] == 4  # the group of two, then the group of two that replaced it
    assert "has been marked dead" in figures["first_console"], figures["first_console"][-3000:]
    assert list(scratch.iterdir()) == []  # nothing of the run on the driver's disk
    files = _files(uri)
    for expected in ("config.yaml", "teacher/manifest.json", "teacher/summary.json", "teacher/errors.jsonl",
                     "teacher/rejects.jsonl", "teacher/config.yaml", "qcrd/train/config.yaml", "qcrd/train/metrics.jsonl",
                     "qcrd/train/negatives.jsonl", f"qcrd/train/init_model/{storage.COMPLETE_MARKER}",
                     "qcrd/model/config.json", "qcrd/model/discriminator.pt", f"qcrd/model/{storage.COMPLETE_MARKER}",
                     "qcrd/eval/test-predict/metrics.json", "qcrd/eval/test-predict/predictions.jsonl",
                     "qcrd/eval/test-explain/metrics.json", "report.md", "figures/qcrd-training.png",
                     "logs/qcrd.log", "logs/workers.log"):
        assert expected in files, (expected, files)
    for pattern in (r"teacher/part-\d+\.parquet", r"qcrd/train/tensorboard/events\.out\.tfevents\..+",
                    r"qcrd/train/snapshots/round_\d{4}\.safetensors"):
        assert any(re.fullmatch(pattern, f) for f in files), (pattern, files)
    # train.keep_checkpoints (2): the older ones were deleted from the bucket, the kept ones are whole
    kept = sorted({f.split("/")[3] for f in files if f.startswith("qcrd/train/checkpoints/round_")})
    assert kept == [f"round_{r:04d}" for r in range(ROUNDS - 1, ROUNDS + 1)], kept
    # the resumed run trained the rounds it was asked for, no more, no less
    state = ckpt.load_state(ckpt.latest(storage.join(uri, "qcrd", "train", "checkpoints")))
    assert (state.completed_rounds, state.global_step) == (ROUNDS, ROUNDS * ROUND_STEPS)
    # every step and every round end logged exactly once: what the killed run logged past its checkpoint was
    # replayed by the resumed one and dropped from the file
    lines = [json.loads(line) for line in storage.read_text(
        storage.join(uri, "qcrd", "train", "metrics.jsonl")).splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, ROUNDS * ROUND_STEPS + 1))
    assert [m["completed_rounds"] for m in lines if "completed_rounds" in m] == list(range(1, ROUNDS + 1))
    assert {m["round"] for m in lines if "loss" in m} == set(range(ROUNDS))
    metrics = json.loads(storage.read_text(storage.join(uri, "qcrd", "eval", "test-predict", "metrics.json")))
    assert metrics["n"] == EVAL_SIZE
    print(f"\ndriver killed after checkpoint {figures['rounds_at_kill']}; the same command finished the run in "
          f"{figures['resume_s']:.0f}s")


def test_a_second_driver_elsewhere_evaluates_and_reports_the_run_from_its_uri(run_uri, multinode_cluster, tmp_path):
    uri, _, _ = run_uri
    stored = json.loads(storage.read_text(storage.join(uri, "qcrd", "eval", "test-predict", "metrics.json")))
    result = _qcrd(multinode_cluster, tmp_path, "eval", "--model", storage.join(uri, "qcrd"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert (metrics["n"], metrics["correct"]) == (stored["n"], stored["correct"])  # same model, greedy decoding

    storage.delete(storage.join(uri, "report.md"))
    result = _qcrd(multinode_cluster, tmp_path, "report", "--out", uri)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "qcrd" in storage.read_text(storage.join(uri, "report.md"))
    assert list(tmp_path.iterdir()) == []



def test_a_second_driver_serves_the_run_from_its_uri(run_uri, multinode_cluster, tmp_path):
    """`qcrd serve` from another directory answers from the run's URI, and a SIGTERM as soon as it answers shuts
    it down cleanly: exit 0, and no Serve actor left on the cluster. (Its SIGTERM handler once came after the
    deploy, whose `serve.run` returns up to a second after the app answers; a SIGTERM in between exited through
    Ray's own handler, 15, and Serve's detached actors kept their CPUs.)"""
    import httpx
    from ray import serve

    uri, _, _ = run_uri
    port = free_port()
    # its console to a file, not a pipe nobody reads while it runs: Ray's log lines would fill the pipe, and a
    # server blocked on a write never reaches its SIGTERM shutdown
    console = tmp_path.parent / "serve-console.txt"
    with open(console, "w") as console_out:
        server = subprocess.Popen([QCRD, "serve", "--model", storage.join(uri, "qcrd"), "--port", str(port)],
                                  cwd=tmp_path, env=_env(multinode_cluster), stdout=console_out,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert server.poll() is None, console.read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=patience(5)).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "qcrd serve never became healthy"
            time.sleep(1)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"input": "What is 5 plus 3?"},
                          timeout=patience(60))
        assert resp.status_code == 200, resp.text
        # the answer's shape, not its value: a 9-step student rarely writes a parseable answer (its eval parses
        # none of 12), and the response says so with a null label rather than failing
        body = resp.json()
        assert isinstance(body["output"], str) and body["model"]
        assert body["label"] is None or isinstance(body["label"], str)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=patience(60))
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=patience(60))
        left = _serve_actors_alive()
        serve.shutdown()  # whatever it left goes, so a failure here cannot starve the tests after it of CPUs
    assert server.returncode == 0, console.read_text()[-4000:]
    assert "qcrd serve: shutting down" in console.read_text()
    assert not left, f"Serve actors outlived qcrd serve: {left}"


def _serve_actors_alive() -> list[str]:
    """The classes of the live actors Ray Serve runs (its controller, proxies and replicas)."""
    serve_classes = ("Serve", "Proxy", "Replica")
    return [a["ActorClassName"] for a in _live_actors(lambda name: any(k in name for k in serve_classes))]


def _nodes_of_teacher_actors(cluster, pids: set[int]) -> list:
    """The worker nodes that run a live teacher actor (Ray Data's ``MapWorker``) whose process is one of ``pids``."""
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    return [nodes[a["Address"]["NodeID"]] for a in _live_actors(lambda name: "MapWorker" in name)
            if a["Pid"] in pids and a["Address"]["NodeID"] in nodes]


def test_a_node_lost_mid_teach_loses_no_example_and_duplicates_none(multinode_cluster, s3_server):
    """`qcrd teach` to S3 (the http teacher, two actors) while the worker node of a teacher actor that holds a
    request is removed without a goodbye (and a replacement added, as an autoscaler would): Ray restarts the
    actor on a live node, its batch runs again, and the shards hold every example exactly once with all K
    samples answered. (After the run's tests: Serve's detached actors of the serve test may still hold a CPU.)"""
    from qcrd_ray.config import Config
    from qcrd_ray.teacher.pipeline import iter_teacher_rows, run_teacher
    from qcrd_ray.teacher.shards import MANIFEST

    examples, k = 16, 2
    server = HoldingTeacher("<Explanation>: I add the two numbers together. <Answer>: 8", answer_freely=4,
                            hold_s=WAIT_S)
    out = storage.join(s3_server, "multinode", "teach-node-loss")
    cfg = Config().replace(
        data={"synthetic_train_size": examples},
        teacher={"backend": "http", "model": "m", "base_url": server.base_url, "k": k, "shard_rows": 4,
                 "batch_size": 2, "min_actors": 2, "max_actors": 2, "num_cpus": 0.25, "max_concurrency": 1,
                 "timeout_s": WAIT_S, "max_retries": 0},
    )
    lost, requests_at_loss = [], []

    def lose_a_node_mid_batch():
        try:
            assert server.held.acquire(timeout=WAIT_S), "the teacher pool never reached the server"
            deadline = time.monotonic() + WAIT_S
            # the node of an actor that holds a request now: the other actor may sit between batches, and losing it
            # would resend nothing
            while not (nodes := _nodes_of_teacher_actors(multinode_cluster, server.holders())) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert nodes, "no teacher actor held a request"
            requests_at_loss.append(server.requests)
            multinode_cluster.remove_node(nodes[0], allow_graceful=False)
            lost.append(nodes[0])
            # a replacement, as an autoscaler brings one: the restarted actor and Ray Data's tasks find room on a
            # live node whatever else the cluster holds
            multinode_cluster.add_node(num_cpus=1)
        finally:
            server.resume()  # never leave the run hanging on a failed wait here

    remover = threading.Thread(target=lose_a_node_mid_batch, daemon=True)
    remover.start()
    started = time.monotonic()
    try:
        summary = run_teacher(cfg, out)
        elapsed = time.monotonic() - started
    finally:
        remover.join(timeout=WAIT_S)
        server.close()
        multinode_cluster.wait_for_nodes()
    assert lost, "no node was removed"
    assert requests_at_loss[0] < examples * k  # the loss landed mid-teach
    assert max(server.attempts.values()) >= 2  # the lost actor's batch was sent again
    rows = list(iter_teacher_rows(out))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == json.loads(storage.read_text(storage.join(out, MANIFEST)))["examples"] \
        == examples
    for row in rows:  # every sample exactly once, answered (not an error left by the lost node)
        assert [s["index"] for s in row["samples"]] == list(range(k)), row["id"]
        assert {s["status"] for s in row["samples"]} == {"ok"}, row["samples"]
    assert summary["samples"] == examples * k and summary["request_failures"] == 0
    resent = sum(n - 1 for n in server.attempts.values())
    print(f"\nnode lost mid-teach: requests at the loss {requests_at_loss[0]}/{examples * k}, {resent} requests "
          f"resent, 0 rows lost or duplicated, teach {elapsed:.1f}s")


@pytest.mark.parametrize("entrypoint", [["-m", "jobs.pipeline"], ["-m", "jobs.teach"]])
def test_a_job_with_a_relative_out_is_refused_on_a_multi_node_cluster(multinode_cluster, s3_server, tmp_path,
                                                                      entrypoint):
    # the job's driver as the job supervisor starts it: in the shipped working dir, RAY_ADDRESS set
    result = subprocess.run([sys.executable, *entrypoint, "--out", "runs/x", *SMALL_RUN], cwd=ROOT,
                            env=_env(multinode_cluster), capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "'runs/x' is a relative path on a multi-node cluster" in result.stderr
    assert "s3://bucket/run" in result.stderr
    assert not (ROOT / "runs" / "x").exists()


def test_the_location_check_in_process(multinode_cluster, s3_server, tmp_path, monkeypatch, capsys):
    from qcrd_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["teach", "--out", "runs/x"]) == 2
    assert "relative path on a multi-node cluster" in capsys.readouterr().err
    assert main(["run", *SMALL_RUN]) == 2  # qcrd run's default, runs/<task>, is relative too
    assert "'runs/<task>' is a relative path" in capsys.readouterr().err
    assert main(["sweep", "--config", str(ROOT / "sweeps" / "pilot_v2.yaml"), "--out", "runs/s"]) == 2
    assert "'runs/s' is a relative path on a multi-node cluster" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
