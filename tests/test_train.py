"""2-worker DDP training on CPU on the synthetic task: every method learns; QCRD's negatives lag j rounds;
a train worker killed mid-run (SIGKILL of its process) is survived within the same call, and a run stopped by
one resumes on rerun; both end exactly like an uninterrupted run."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from qcrd_ray import storage
from qcrd_ray.methods import method_spec
from qcrd_ray.runs import MethodLayout
from qcrd_ray.testing import patience
from qcrd_ray.train import checkpoint as ckpt
from qcrd_ray.train.trainer import run_training
from train_fixtures import small_config, write_teacher_dir

pytestmark = pytest.mark.ray

WAIT_S = patience(120.0)  # bound on every wait of the killer below (a loaded 2-core machine starts workers slowly)
TRAIN_WORKER_CLASS = "RayTrainWorker"  # Ray Train's worker actor class
# rounds long enough (a few seconds each here) that a kill after round 1's checkpoint lands before the run ends
RESUME_CFG = dict(train={"rounds": 4, "round_steps": 4, "method": "qcrd"})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_teacher_dir(tmp_path_factory.mktemp("teacher"))


def _step_metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m]


@pytest.mark.parametrize("method", ["finetune", "dss", "qcrd"])
def test_every_method_trains_and_its_loss_falls(ray_session, teacher_dir, tmp_path, method):
    cfg = small_config(train={"method": method})
    summary = run_training(cfg, teacher_dir, tmp_path / "run")

    assert summary["method"] == method and summary["rounds"] == 3 and summary["steps"] == 9
    steps = _step_metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == list(range(1, 10))
    first, last = steps[0]["loss"], sum(m["loss"] for m in steps[-3:]) / 3
    assert last < 0.8 * first, f"{method}: loss {first:.3f} -> {last:.3f}"
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert (model_dir / storage.COMPLETE_MARKER).is_file()  # exported whole: the marker is written last
    assert (model_dir / ckpt.DISC_FILE).is_file() == method_spec(cfg).needs_discriminator(cfg)
    kept = sorted(p.name for p in (tmp_path / "run" / "train" / "checkpoints").glob("round_*"))
    assert kept == ["round_0002", "round_0003"]  # train.keep_checkpoints = 2
    assert list((tmp_path / "run" / "train" / "tensorboard").glob("events.out.tfevents.*"))
    if method_spec(cfg).needs_student_negatives(cfg):
        # round r trains on negatives sampled from the student of round r - j (j = 1), round 0 on the initial one
        assert {m["round"]: m["neg_lag"] for m in steps} == {0: 0.0, 1: 1.0, 2: 1.0}
        assert all(0.0 < m["s_pos"] < 1.0 and 0.0 < m["s_neg"] < 1.0 for m in steps)
        negatives = [json.loads(line) for line in (tmp_path / "run" / "train" / "negatives.jsonl").open()]
        assert len(negatives) == 64 and {n["round"] for n in negatives} == {1}  # round 2's, from snapshot 1


# ---------------------------------------------------------------------------------------------- faults


def _train_workers(state: str | None = "ALIVE") -> list:
    import ray
    from ray.util.state import list_actors

    filters = [("class_name", "=", TRAIN_WORKER_CLASS)] + ([("state", "=", state)] if state else [])
    address = ray.get_runtime_context().gcs_address  # this session's cluster, never another one on the machine
    return list_actors(address=address, filters=filters, limit=1000, raise_on_missing_output=False)


class WorkerKiller(threading.Thread):
    """SIGKILLs one of the run's train worker processes (PID from Ray's state API) as soon as round 1's
    checkpoint is complete in ``layout``: a real crash mid-round 2, no exception planted in the code."""

    def __init__(self, layout: MethodLayout):
        super().__init__(daemon=True)
        self.layout = layout
        self.before = {a.actor_id for a in _train_workers(state=None)}
        self.killed: int | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _wait(self, what: str, probe):
        deadline = time.monotonic() + WAIT_S
        while not self.stop.is_set():
            found = probe()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen within {WAIT_S}s")
            time.sleep(0.05)
        return None

    def run(self) -> None:
        try:
            # the PIDs are looked up before the checkpoint appears, so the kill follows it within one poll
            workers = self._wait("the run's train workers", lambda: [
                a for a in _train_workers() if a.actor_id not in self.before and a.pid] or None)
            if self._wait("round 1's checkpoint", lambda: ckpt.latest(self.layout.checkpoints)):
                os.kill(workers[0].pid, signal.SIGKILL)
                self.killed = workers[0].pid
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def started_workers(self) -> int:
        """Train worker actors started since this killer was made (2 per worker group start)."""
        return sum(1 for a in _train_workers(state=None) if a.actor_id not in self.before)

    def __enter__(self) -> "WorkerKiller":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=WAIT_S)
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def uninterrupted(ray_session, teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    return out, run_training(small_config(**RESUME_CFG), teacher_dir, out)


def _same_initial_student(whole, other) -> None:
    # Both runs start from the same initial student (its random init is seeded; this pins it even so).
    shutil.copytree(whole / "train" / "init_model", other / "train" / "init_model")


def _assert_same_as_uninterrupted(whole, whole_summary, other, summary) -> None:
    assert (summary["rounds"], summary["steps"]) == (whole_summary["rounds"], whole_summary["steps"]) == (4, 16)
    # no step lost or logged twice across the restart (the killed attempt's lines after its checkpoint dropped)
    assert [m["step"] for m in _step_metrics(other)] == list(range(1, 17))
    rounds = [json.loads(line)["completed_rounds"] for line in (other / "train" / "metrics.jsonl").open()
              if "completed_rounds" in line]
    assert rounds == [1, 2, 3, 4]
    # Same optimizer state, data order, RNG and snapshots after the restart => the same final weights, student and
    # D, to the bit (one machine, the same kernels and thread counts)
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(other / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    d_a = torch.load(whole / "model" / ckpt.DISC_FILE, weights_only=True)
    d_b = torch.load(other / "model" / ckpt.DISC_FILE, weights_only=True)
    assert d_a.keys() == d_b.keys() and [name for name in d_a if not torch.equal(d_a[name], d_b[name])] == []
    opt_a = ckpt.load_state(whole / "train" / "checkpoints" / "round_0004").optimizer
    opt_b = ckpt.load_state(other / "train" / "checkpoints" / "round_0004").optimizer
    assert [s["step"] for s in opt_a["state"].values()] == [s["step"] for s in opt_b["state"].values()]


def test_a_killed_train_worker_is_restarted_from_the_checkpoint_in_the_same_call(
        uninterrupted, teacher_dir, tmp_path):
    whole, whole_summary = uninterrupted
    out = tmp_path / "killed"
    _same_initial_student(whole, out)
    cfg = small_config(**RESUME_CFG)
    assert cfg.train.max_failures == 3  # the default

    with WorkerKiller(MethodLayout.at(str(out))) as killer:
        summary = run_training(cfg, teacher_dir, out)
    assert killer.killed is not None
    assert killer.started_workers() == 4  # the worker group of 2 started twice: once, and once after the kill
    _assert_same_as_uninterrupted(whole, whole_summary, out, summary)
    # each start recorded where it ran: the first at step 0, the restart at its checkpoint's step
    starts = storage.read_jsonl(str(out / "train" / "environment.jsonl"))
    assert [s["world_size"] for s in starts] == [2, 2] and starts[0]["step"] == 0
    assert 0 < starts[1]["step"] < 16 and starts[1]["step"] % 4 == 0  # a round boundary: a checkpoint's step
    assert {(s["cpu_capability"], s["packages"]["torch"]) for s in starts} == {
        (torch.backends.cpu.get_cpu_capability(), importlib.metadata.version("torch"))}
    # Rerunning a finished run only re-exports it. (Resuming an interrupted run by rerunning the command: the
    # multi-node test kills the driver mid-training and reruns it, tests/test_multinode.py.)
    assert run_training(cfg, teacher_dir, out)["steps"] == 16
    assert killer.started_workers() == 4


def test_a_run_stopped_by_a_kill_once_its_failures_are_spent_resumes_when_rerun(
        uninterrupted, teacher_dir, tmp_path):
    import ray.train

    whole, whole_summary = uninterrupted
    out = tmp_path / "spent"
    _same_initial_student(whole, out)
    cfg = small_config(train={**RESUME_CFG["train"], "max_failures": 0})

    with WorkerKiller(MethodLayout.at(str(out))) as killer, pytest.raises(ray.train.TrainingFailedError):
        run_training(cfg, teacher_dir, out)
    assert killer.killed is not None and killer.started_workers() == 2  # no restart: none was left
    assert not storage.is_complete(str(out / "model"))
    # the same call again (what rerunning the command does) resumes from round 1's checkpoint
    summary = run_training(cfg, teacher_dir, out)
    assert killer.started_workers() == 4
    _assert_same_as_uninterrupted(whole, whole_summary, out, summary)
