"""A run on an S3 bucket (a real S3-compatible server on loopback, fixture ``s3_server``): `qcrd run --out
s3://…` leaves every artifact in the bucket and nothing in the working directory, and `qcrd eval` / `qcrd report`
work from the URI alone. Checkpoint completeness (a torn checkpoint is never resumed from) is checked here too."""

from __future__ import annotations

import json
import re

import pytest

from qcrd_ray import storage
from qcrd_ray.cli import main
from qcrd_ray.train import checkpoint as ckpt
from test_pipeline import SMALL
from train_fixtures import small_config

pytestmark = pytest.mark.ray


def _keys(uri: str) -> set[str]:
    """Every object under ``uri``, relative to it."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_latest_skips_a_checkpoint_whose_upload_was_cut(tmp_path):
    from qcrd_ray.student import load_student

    model, tokenizer = load_student(small_config().student, ["what is 3 + 4 ?", "the answer is 7"])
    state = lambda rounds: ckpt.TrainerState(rounds, 2 * rounds, 0.5, {}, {}, [])  # noqa: E731
    good = ckpt.save(tmp_path / "round_0001", model, tokenizer, None, state(1))
    torn = ckpt.save(tmp_path / "round_0002", model, tokenizer, None, state(2))
    (torn / ckpt.STATE_FILE).write_bytes((torn / ckpt.STATE_FILE).read_bytes()[:10])  # cut mid-upload
    assert ckpt.is_complete(good) and not ckpt.is_complete(torn)
    (tmp_path / "round_0003").mkdir()  # created, nothing uploaded yet (no listing)
    assert ckpt.latest(tmp_path) == str(good)
    assert ckpt.load_state(ckpt.latest(tmp_path)).completed_rounds == 1
    assert ckpt.latest(tmp_path / "missing") is None


@pytest.mark.slow
def test_qcrd_run_on_s3_leaves_everything_in_the_bucket_and_nothing_locally(
        s3_server, ray_session, tmp_path, monkeypatch, capsys):
    run = f"{s3_server}/run"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    assert main(["run", "--out", run, "--methods", "qcrd", *SMALL]) == 0
    assert list(scratch.iterdir()) == []

    keys = _keys(run)
    expected = {"config.yaml", "teacher/summary.json", "teacher/manifest.json", "report.md", "logs/qcrd.log",
                "logs/workers.log", "figures/qcrd-training.png", "qcrd/train/config.yaml",
                "qcrd/train/metrics.jsonl", "qcrd/train/negatives.jsonl", "qcrd/model/config.json",
                "qcrd/model/discriminator.pt", f"qcrd/model/{storage.COMPLETE_MARKER}",
                f"qcrd/train/init_model/{storage.COMPLETE_MARKER}",
                "qcrd/eval/test-predict/metrics.json", "qcrd/eval/test-predict/predictions.jsonl",
                "qcrd/eval/test-explain/metrics.json"}
    assert expected <= keys, expected - keys
    assert any(re.fullmatch(r"teacher/part-\d+\.parquet", k) for k in keys)
    assert any(k.startswith("qcrd/train/tensorboard/events.out.tfevents.") for k in keys)
    assert any(re.fullmatch(r"qcrd/train/snapshots/round_\d{4}\.safetensors", k) for k in keys)
    checkpoints = sorted({k.split("/")[3] for k in keys if k.startswith("qcrd/train/checkpoints/round_")})
    assert checkpoints == ["round_0001", "round_0002"]  # train.rounds=2, keep_checkpoints=2
    assert ckpt.load_state(ckpt.latest(f"{run}/qcrd/train/checkpoints")).global_step == 8
    steps = [m["step"] for m in map(json.loads, storage.read_text(f"{run}/qcrd/train/metrics.jsonl").splitlines())
             if "loss" in m]
    assert steps == list(range(1, 9))
    assert "stage train (qcrd)" in storage.read_text(f"{run}/logs/qcrd.log")
    capsys.readouterr()

    # a second use of the run from the URI alone: eval writes to the bucket, the report is rebuilt there
    storage.delete(f"{run}/report.md")
    assert main(["report", "--out", run]) == 0
    report = storage.read_text(f"{run}/report.md")
    assert "| qcrd |" in report and "figures/qcrd-training.png" in report
    assert main(["eval", "--model", f"{run}/qcrd", "--split", "valid", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads(storage.read_text(f"{run}/qcrd/eval/valid-predict/metrics.json"))
    assert stored == printed and stored["n"] > 0
    assert list(scratch.iterdir()) == []
