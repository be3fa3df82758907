"""2-worker DDP training on CPU on the synthetic task: every method learns; QCRD's negatives lag j rounds;
a run killed mid-way resumes where it stopped and ends like an uninterrupted one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qcrd_ray.methods import method_spec
from qcrd_ray.train import checkpoint as ckpt
from qcrd_ray.train.trainer import FAIL_AFTER_ROUND_ENV, run_training
from train_fixtures import small_config, write_teacher_dir

pytestmark = pytest.mark.ray


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
    assert (model_dir / ckpt.DISC_FILE).is_file() == method_spec(cfg).needs_discriminator(cfg)
    kept = sorted(p.name for p in (tmp_path / "run" / "train" / "checkpoints").glob("round_*"))
    assert kept == ["round_0002", "round_0003"]  # train.keep_checkpoints = 2
    assert list((tmp_path / "run" / "train" / "tensorboard").glob("events.out.tfevents.*"))
    if method_spec(cfg).needs_student_negatives(cfg):
        # round r trains on negatives sampled from the student of round r - j (j = 1), round 0 on the initial one
        assert {m["round"]: m["neg_lag"] for m in steps} == {0: 0.0, 1: 1.0, 2: 1.0}
        assert all(0.0 < m["s_pos"] < 1.0 and 0.0 < m["s_neg"] < 1.0 for m in steps)


def test_killed_run_resumes_at_its_round_and_matches_an_uninterrupted_run(
        ray_session, teacher_dir, tmp_path, monkeypatch):
    cfg = small_config(train={"rounds": 4, "round_steps": 2, "method": "qcrd"})
    whole = run_training(cfg, teacher_dir, tmp_path / "whole")
    # Start both runs from the same initial student (the tiny tokenizer's training is not bit-reproducible).
    shutil.copytree(tmp_path / "whole" / "train" / "init_model", tmp_path / "killed" / "train" / "init_model")

    monkeypatch.setenv(FAIL_AFTER_ROUND_ENV, "2")
    with pytest.raises(Exception, match="simulated worker failure"):
        run_training(cfg, teacher_dir, tmp_path / "killed")
    last = ckpt.latest(tmp_path / "killed" / "train" / "checkpoints")
    assert last.name == "round_0002" and not (tmp_path / "killed" / "model").exists()
    interrupted = ckpt.load_state(last)
    assert interrupted.completed_rounds == 2 and interrupted.global_step == 4

    monkeypatch.delenv(FAIL_AFTER_ROUND_ENV)
    resumed = run_training(cfg, teacher_dir, tmp_path / "killed")

    assert (resumed["rounds"], resumed["steps"]) == (whole["rounds"], whole["steps"]) == (4, 8)
    assert [m["step"] for m in _step_metrics(tmp_path / "killed")] == list(range(1, 9))  # no step lost or repeated
    # Same optimizer state, data order, RNG and snapshots after the restart => the same final weights.
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    opt_a = ckpt.load_state(tmp_path / "whole" / "train" / "checkpoints" / "round_0004").optimizer
    opt_b = ckpt.load_state(tmp_path / "killed" / "train" / "checkpoints" / "round_0004").optimizer
    assert [s["step"] for s in opt_a["state"].values()] == [s["step"] for s in opt_b["state"].values()]

    again = run_training(cfg, teacher_dir, tmp_path / "killed")  # a finished run only re-exports
    assert again["steps"] == 8
