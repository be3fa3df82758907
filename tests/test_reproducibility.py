"""Same config and seed, same result across processes: `qcrd run` (teacher, 2 DDP workers, DSS, then QCRD with its
negative samplers and discriminator, eval) gives identical teacher shards, weights and predictions in another
process, with its own Ray, into another run folder. And a run whose driver is SIGKILLed (its whole process group,
no chance to clean up) once a complete training checkpoint of QCRD is on disk resumes, by rerunning the same command,
to the same bits as an uninterrupted one: the student's weights and D's.

The uninterrupted run is conftest's shared_run; this module adds one run killed mid-QCRD and its resumption."""

from __future__ import annotations

import json
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import QCRD_RUN_TIMEOUT_S, SHARED_METHODS, kill_session, qcrd_run_args, start_qcrd
from qcrd_ray import storage
from qcrd_ray.train import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROUNDS = 2  # train.rounds in conftest.SMALL


def _tensors(path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def _different(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]


def _ray_train_latest(checkpoints) -> str | None:
    """The checkpoint Ray Train would hand a new ``fit`` (``ray.train.get_checkpoint``): the latest one its
    checkpoint manager recorded, which it does only after the checkpoint's folder is uploaded. (For a diagnosis
    only: see the resume assertion.)"""
    try:
        snapshot = json.loads((checkpoints / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # none yet, or cut short by the kill
        return None
    return ((snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))


@pytest.fixture(scope="module")
def resumed_run(shared_run, tmp_path_factory):
    """The shared run's command into another folder: its driver's process group SIGKILLed as soon as QCRD has a
    complete checkpoint, then the same command again, to completion. Returns (run folder, what was there at the
    kill, when the rerun started)."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    checkpoints = out / "qcrd" / "train" / "checkpoints"
    logs = out.parent / "killed-driver.txt"  # a file, not a pipe: nobody reads it while the run goes on
    with logs.open("w") as printed:
        first = start_qcrd(qcrd_run_args(out), stdout=printed, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + QCRD_RUN_TIMEOUT_S
        try:
            # a whole checkpoint (every file its marker lists, at its size), not the first file of one
            while not (killed_at := ckpt.latest(checkpoints)) and first.poll() is None:
                assert time.monotonic() < deadline, f"no QCRD checkpoint in {QCRD_RUN_TIMEOUT_S:.0f} s"
                time.sleep(0.05)
            ended = first.poll()
        finally:
            kill_session(first)  # the driver, its Ray and Ray's workers
    assert ended is None, f"the run ended (exit {ended}) before it was killed: {logs.read_text()[-4000:]}"
    at_kill = {"rounds": ckpt.load_state(killed_at).completed_rounds,
               "complete": {m: storage.is_complete(str(out / m / "model")) for m in SHARED_METHODS},
               "qcrd_eval": (out / "qcrd" / "eval").exists(),
               "ray_train_latest": _ray_train_latest(checkpoints)}
    rerun_at = time.time()
    second = start_qcrd(qcrd_run_args(out))
    try:
        stdout, stderr = second.communicate(timeout=QCRD_RUN_TIMEOUT_S)
    finally:
        kill_session(second)
    assert second.returncode == 0, (stdout + stderr)[-6000:]
    return out, at_kill, rerun_at


@pytest.mark.timeout(3 * QCRD_RUN_TIMEOUT_S + 300)  # the shared run (if no test ran it yet), the killed one, its resumption
def test_a_run_killed_mid_training_resumes_to_the_same_bits_as_an_uninterrupted_one(shared_run, resumed_run):
    a = shared_run.out
    b, at_kill, rerun_at = resumed_run
    # the kill landed during QCRD's training, after a whole checkpoint and before its last round: DSS was done,
    # QCRD's model not exported, one round left for the resumed run to train
    ray_train_latest = at_kill.pop("ray_train_latest")
    assert at_kill == {"rounds": 1, "complete": {"dss": True, "qcrd": False}, "qcrd_eval": False}, at_kill
    # ...and the rerun resumed from that checkpoint: the workers said so, round 1 ended before the rerun started and
    # round 2 after it (a rerun that trained from scratch rewrites round 1's line)
    rerun_log = (b / "logs" / "workers.log").read_text().split("===== ")[-1]  # the rerun's section
    # Known hazard (qcrd_ray, not this test): the loop resumes from ray.train.get_checkpoint(), which on a new fit
    # is the last checkpoint Ray Train's checkpoint_manager_snapshot.json records, written by its controller a
    # moment AFTER the folder is complete; the driver (run_training) resumes from ckpt.latest. A kill in between
    # leaves a complete round_0001 that the workers do not get: they train from round 0 while the driver set the
    # negative sampler and snapshot store up for round 1.
    assert "resuming at round 1 (step 4)" in rerun_log, (  # step 4: train.round_steps=4
        f"the rerun did not resume from the complete checkpoint round_0001; Ray Train had recorded "
        f"{ray_train_latest} at the kill")
    ends = [json.loads(line) for line in (b / "qcrd" / "train" / "metrics.jsonl").open() if "completed_rounds" in line]
    assert [m["completed_rounds"] for m in ends] == list(range(1, ROUNDS + 1))  # every round once, none twice
    assert ends[0]["time"] < rerun_at < ends[1]["time"]

    shards = sorted(p.relative_to(a) for p in (a / "teacher").rglob("*.parquet"))
    assert shards and shards == sorted(p.relative_to(b) for p in (b / "teacher").rglob("*.parquet"))
    for shard in shards:
        ta, tb = pq.read_table(a / shard), pq.read_table(b / shard)
        assert ta.num_rows > 0 and ta.equals(tb), shard

    for method in SHARED_METHODS:  # dss: another process; qcrd: another process, killed and resumed
        assert not _different(_tensors(a / method / "model"), _tensors(b / method / "model")), method  # to the bit
        assert ((a / method / "model" / "tokenizer.json").read_bytes()
                == (b / method / "model" / "tokenizer.json").read_bytes()), method
    d_a = torch.load(a / "qcrd" / "model" / ckpt.DISC_FILE, weights_only=True)
    d_b = torch.load(b / "qcrd" / "model" / ckpt.DISC_FILE, weights_only=True)
    assert d_a and not _different(d_a, d_b)

    # the student's negatives of the last round (what the samplers wrote, whenever they wrote it)
    negatives = [sorted((run / "qcrd" / "train" / "negatives.jsonl").read_text().splitlines()) for run in (a, b)]
    assert negatives[0] and negatives[0] == negatives[1]

    for method in SHARED_METHODS:
        for mode in ("predict", "explain"):
            ea, eb = a / method / "eval" / f"test-{mode}", b / method / "eval" / f"test-{mode}"
            ma, mb = (json.loads((e / "metrics.json").read_text()) for e in (ea, eb))
            assert ma.pop("model") != mb.pop("model")  # each names its own run's model folder; the rest must agree
            assert ma["n"] > 0 and ma == mb, (method, mode)
            assert (ea / "predictions.jsonl").read_text() == (eb / "predictions.jsonl").read_text(), (method, mode)
