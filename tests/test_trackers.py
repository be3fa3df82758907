"""Trackers: a real MLflow tracking server on loopback (run rows and metric histories read back through the
MLflow client) and W&B in offline mode (its run files checked); neither is imported unless configured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qcrd_ray.config import ConfigError, from_dict
from qcrd_ray.testing import free_port, patience
from qcrd_ray.trackers import log_results, open_trackers

# what rank 0 writes to metrics.jsonl: per-step lines (every loss term, D's scores, lr, throughput) and round ends
STEP_LINES = [
    {"loss": 2.0 - 0.1 * s, "l_pred": 1.0, "l_cl": 0.5, "l_pos": 0.4, "l_neg": 0.1, "l_d": 0.7, "s_pos": 0.6,
     "s_neg": 0.3, "step": s, "round": 0, "lr": 0.003, "alpha3": 0.5, "examples_per_s": 40.0 + s}
    for s in (1, 2, 3)
] + [{"step": 3, "completed_rounds": 1, "round_s": 1.5, "neg_wait_s": 0.0, "time": 1.8e9}]



@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free loopback port with a SQLite store, waited for, stopped with its workers."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # no job runner (its consumers are a few processes this test does not need)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + patience(300)  # a loaded 2-core machine: the server has taken 100 s to start
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=patience(2)) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"mlflow server did not answer /health in {patience(300):.0f} s"
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=patience(30))
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_no_tracker_is_imported_unless_configured(tmp_path):
    code = ("import sys; from qcrd_ray.config import from_dict; from qcrd_ray.trackers import open_trackers, "
            f"log_results; assert open_trackers(from_dict({{}}), {str(tmp_path)!r}) == []; "
            f"log_results(from_dict({{}}), {str(tmp_path)!r}, {{'test_predict': 0.5}}); "
            "import qcrd_ray.train.loop, qcrd_ray.sweep.tune; "
            "print(sorted(m for m in ('mlflow', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert not (tmp_path / "train" / "trackers.json").exists()


def test_unknown_tracker_is_refused():
    with pytest.raises(ConfigError, match="train.trackers: 'neptune'"):
        from_dict({"train": {"trackers": ["tensorboard", "neptune"]}})


def _cfg(**train):
    return from_dict({"train": {"method": "qcrd", **train}})


def test_mlflow_gets_every_series_and_the_eval_results_in_one_run_per_training(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(trackers=["tensorboard", "mlflow"], tracking_uri=mlflow_server, experiment="exp-a", run_name="t1")
    method_dir = str(tmp_path / "run" / "qcrd")
    for tracker in open_trackers(cfg, method_dir):  # the training (rank 0's log)
        for line in STEP_LINES:
            tracker.log(line, line["step"])
        tracker.close()
    resumed = open_trackers(cfg, method_dir)  # a resumed training continues the same run
    resumed[0].log({"loss": 1.0, "step": 4}, 4)
    resumed[0].close()
    log_results(cfg, method_dir, {"valid_predict": 0.4, "test_predict": 0.375, "test_explain": 0.25})
    # a second training (another trial of the sweep) under the same experiment
    other = _cfg(trackers=["mlflow"], tracking_uri=mlflow_server, experiment="exp-a", run_name="t2")
    log_results(other, str(tmp_path / "run2" / "qcrd"), {"test_predict": 0.5})

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("exp-a")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["t1", "t2"]
    run = next(r for r in runs if r.info.run_name == "t1")
    assert run.info.status == "FINISHED"
    assert json.loads((tmp_path / "run" / "qcrd" / "train" / "trackers.json").read_text()) == {
        "mlflow": run.info.run_id}
    for key in ("l_pred", "l_cl", "l_pos", "l_neg", "l_d", "s_pos", "s_neg", "lr", "examples_per_s", "round_s"):
        assert key in run.data.metrics, key
    assert "time" not in run.data.metrics and "step" not in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 1.9), (2, 1.8), (3, 1.7), (4, 1.0)]
    assert run.data.metrics["test_predict"] == 0.375 and run.data.metrics["valid_predict"] == 0.4
    assert run.data.params["train.method"] == "qcrd" and run.data.params["teacher.k"] == "5"


def test_wandb_offline_writes_its_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(trackers=["wandb"], experiment="exp-w", run_name="t1")
    method_dir = str(tmp_path / "run" / "qcrd")
    for tracker in open_trackers(cfg, method_dir):
        for line in STEP_LINES:
            tracker.log(line, line["step"])
        tracker.close()
    log_results(cfg, method_dir, {"test_predict": 0.375})
    # finish() returns before wandb's service process has written the last records (it does at exit, which is
    # where a driver's runs end); teardown waits for the service, as the exit would
    import wandb

    wandb.teardown()
    run_id = json.loads((tmp_path / "run" / "qcrd" / "train" / "trackers.json").read_text())["wandb"]
    # offline-run-<second>-<id>, with "-1", "-2"... when a session of the same id started in the same second
    runs = sorted((tmp_path / "run" / "qcrd" / "train" / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert runs, list((tmp_path / "run" / "qcrd" / "train").rglob("*"))
    # offline, a continued run is a second folder with the same id (`wandb sync` merges them); the records are
    # protobuf, so the series names, the config and the eval result appear verbatim in the .wandb files
    records = b"".join((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    for key in (b"l_pred", b"l_cl", b"s_pos", b"s_neg", b"lr", b"examples_per_s", b"round_s", b"test_predict",
                b"0.375", b"max_target_len"):
        assert key in records, key
