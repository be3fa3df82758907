"""`ray job submit` path: a real head started with `ray start --head`, the pipeline submitted as a job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import submit as jobs_submit

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SMALL_RUN = [
    "--set", "data.synthetic_train_size=48", "--set", "data.synthetic_eval_size=16",
    "--set", "teacher.k=3", "--set", "teacher.shard_rows=24",
    "--set", "train.rounds=2", "--set", "train.round_steps=3", "--set", "train.num_workers=1",
    "--set", "snapshots.j=1", "--set", "snapshots.max_new_tokens=16",
    "--set", "discriminator.pretrain_steps=5", "--set", "discriminator.refresh_steps=2",
    "--set", "student.max_target_len=48",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate local cluster, started the way a user starts one, from this environment's `ray`."""
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_pipeline_job_succeeds_on_a_real_head(ray_head, tmp_path):
    out = tmp_path / "run"
    job_id = jobs_submit.submit(
        ray_head, [sys.executable, "-m", "jobs.pipeline", "--out", str(out), *SMALL_RUN], working_dir=str(ROOT),
        env={"TOKENIZERS_PARALLELISM": "false"},
    )
    status = jobs_submit.wait(ray_head, job_id, timeout_s=600)
    logs = jobs_submit._client(ray_head).get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert jobs_submit.exit_code(status) == 0
    metrics = json.loads((out / "qcrd" / "eval" / "test-predict" / "metrics.json").read_text())
    assert metrics["n"] == 16 and 0.0 <= metrics["accuracy"] <= 1.0
    assert (out / "report.md").exists()
    assert "report:" in logs and "qcrd serve --model" in logs


def test_failed_job_gives_a_nonzero_exit_code(ray_head, tmp_path):
    job_id = jobs_submit.submit(ray_head, [sys.executable, "-m", "jobs.pipeline", "--set", "train.rounds=0"],
                                working_dir=str(ROOT))
    status = jobs_submit.wait(ray_head, job_id, timeout_s=300)
    assert status == "FAILED"
    assert jobs_submit.exit_code(status) == 1
    assert "train.rounds" in jobs_submit._client(ray_head).get_job_logs(job_id)
