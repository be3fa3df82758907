"""Checkpoints on storage: a torn checkpoint is never resumed from. (A whole run on S3, every artifact in the
bucket and nothing local, used again from its URI alone, is tests/test_multinode.py.)"""

from __future__ import annotations

from qcrd_ray.train import checkpoint as ckpt
from train_fixtures import small_config


def test_latest_skips_a_checkpoint_whose_upload_was_cut(tmp_path):
    from qcrd_ray.students import load_student

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
