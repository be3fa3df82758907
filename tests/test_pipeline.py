"""`qcrd run` end to end on a small synthetic task: teach → train (2 DDP workers) → eval → report."""

from __future__ import annotations

import json
import re

import pytest

from qcrd_ray.cli import main

SMALL = [
    "--set", "data.synthetic_train_size=64", "--set", "data.synthetic_eval_size=24",
    "--set", "teacher.k=3", "--set", "teacher.shard_rows=32",
    "--set", "train.rounds=2", "--set", "train.round_steps=4", "--set", "train.batch_size=4",
    "--set", "snapshots.j=1", "--set", "snapshots.max_new_tokens=24",
    "--set", "discriminator.pretrain_steps=10", "--set", "discriminator.refresh_steps=2",
    "--set", "student.max_target_len=64", "--set", "train.log_every=1",
]


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["run", "--out", str(out), "--methods", "dss,qcrd", *SMALL]) == 0
    return out


def test_run_writes_every_stage_and_a_report_with_its_numbers(finished_run, capsys):
    out = finished_run
    teacher = json.loads((out / "teacher" / "summary.json").read_text())
    assert teacher["examples"] == 64
    for method in ("dss", "qcrd"):
        assert (out / method / "model" / "config.json").exists()
        for mode in ("predict", "explain"):
            metrics = json.loads((out / method / "eval" / f"test-{mode}" / "metrics.json").read_text())
            assert metrics["n"] == 24 and metrics["mode"] == mode
    report = (out / "report.md").read_text()
    qcrd_predict = json.loads((out / "qcrd" / "eval" / "test-predict" / "metrics.json").read_text())
    assert re.search(rf"\| qcrd \| {100 * qcrd_predict['accuracy']:.2f} \|", report)
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", report):
        assert (out / figure).stat().st_size > 1000
    assert "qcrd-training.png" in report and "dss-training.png" in report
    assert "discriminator scores" in report.lower()
    assert "\n  k: 3\n" in report  # the resolved config is the one that ran


def test_rerun_reuses_finished_stages(finished_run, capsys):
    model = finished_run / "qcrd" / "model" / "config.json"
    before = model.stat().st_mtime_ns
    assert main(["run", "--out", str(finished_run), "--methods", "dss,qcrd", *SMALL]) == 0
    assert model.stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert "qcrd serve --model" in printed and "report:" in printed


def test_rerun_with_another_config_is_refused(finished_run, capsys):
    assert main(["run", "--out", str(finished_run), *SMALL, "--set", "teacher.k=4"]) == 2
    assert "teacher.k" in capsys.readouterr().err
