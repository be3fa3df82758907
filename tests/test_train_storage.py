"""Checkpoints on storage: a torn checkpoint is never resumed from. (A whole run on S3, every artifact in the
bucket and nothing local, used again from its URI alone, is tests/test_multinode.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from qcrd_ray import storage
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


def test_prune_keeps_the_newest_complete_checkpoints_and_any_newer_partial_one(tmp_path):
    """What Ray Train's num_to_keep cannot delete (a checkpoint it never recorded: its run was killed after the
    upload, before the record, and resumed from it all the same) goes after the run."""
    def complete(rounds: int) -> None:
        folder = tmp_path / ckpt.round_dir_name(rounds)
        folder.mkdir()
        (folder / "a.bin").write_bytes(b"x" * rounds)
        (folder / storage.COMPLETE_MARKER).write_text(json.dumps({"files": {"a.bin": rounds}}))

    for rounds in (1, 3, 4):
        complete(rounds)
    for rounds in (2, 5):  # cut mid-upload: no listing
        (tmp_path / ckpt.round_dir_name(rounds)).mkdir()
    deleted = ckpt.prune(tmp_path, keep=2)
    assert sorted(Path(d).name for d in deleted) == ["round_0001", "round_0002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0003", "round_0004", "round_0005"]
    assert ckpt.prune(tmp_path, keep=2) == [] and ckpt.latest(tmp_path) == str(tmp_path / "round_0004")


class _Payload:
    """What a hostile writer would put in a bucket: unpickling it runs code."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['QCRD_PWNED']).touch()",))


def test_a_trainer_state_with_code_in_it_is_refused_not_run(tmp_path, monkeypatch):
    """Everything read back from storage goes through torch.load(weights_only=True): a state file that would run
    code when unpickled is an error, and the code never runs. A real state (RNG states included) round-trips."""
    import pickle
    import random

    import numpy as np
    import pytest
    import torch

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    step = {"sampling": torch.Generator().manual_seed(5)}  # the training step's own stream (DistillModel.generators)
    torch.rand(3, generator=step["sampling"])
    real = ckpt.TrainerState(2, 4, 0.5, {"state": {0: {"step": torch.tensor(4.0)}}}, {"last_epoch": 4},
                             [ckpt.rng_state(step)])
    (tmp_path / "good").mkdir()
    torch.save(vars(real), tmp_path / "good" / ckpt.STATE_FILE)
    loaded = ckpt.load_state(tmp_path / "good")
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=step["sampling"]))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    resumed = {"sampling": torch.Generator().manual_seed(5)}  # as a restarted worker builds it: at its seed
    ckpt.set_rng_state(loaded.rng[0], resumed)
    assert (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=resumed["sampling"])) == expected

    marker = tmp_path / "pwned"
    monkeypatch.setenv("QCRD_PWNED", str(marker))
    (tmp_path / "bad").mkdir()
    torch.save({**vars(real), "alpha3": _Payload()}, tmp_path / "bad" / ckpt.STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_state(tmp_path / "bad")
    assert not marker.exists()


def test_a_gpu_ranks_device_rng_is_saved_and_restored(tmp_path, monkeypatch):
    """On a GPU rank dropout draws from the device's generator, which ``torch.manual_seed`` resets on start: the
    checkpoint carries it, and a resumed rank continues it. No GPU here: torch.cuda's RNG calls are faked (the
    state round-trips through torch.save/load(weights_only=True) for real)."""
    import torch

    device_state = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: device_state.update(now=state))
    state = ckpt.TrainerState(1, 4, 0.45, {}, {}, [ckpt.rng_state()])
    (tmp_path / "ck").mkdir()
    torch.save(vars(state), tmp_path / "ck" / ckpt.STATE_FILE)
    device_state["now"] = torch.zeros(16, dtype=torch.uint8)  # a restarted worker, reseeded
    ckpt.set_rng_state(ckpt.load_state(tmp_path / "ck").rng[0])
    assert torch.equal(device_state["now"], torch.arange(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU rank: nothing of the device's saved
    assert "cuda" not in ckpt.rng_state()
