"""Negative sampler actors: one negative per example, tagged with the snapshot round it was sampled from."""

from __future__ import annotations

import pytest
import torch

from qcrd_ray.config import SnapshotConfig, from_dict
from qcrd_ray.data.synthetic import make_split
from qcrd_ray.actors.sampler import NegativePool
from qcrd_ray.actors.snapshots import SnapshotStore, cpu_state_dict
from qcrd_ray.students import load_student, save_student

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    cfg = from_dict({"student": {"tiny_d_model": 16, "tiny_d_ff": 32, "tiny_layers": 1, "tiny_heads": 2,
                                 "tiny_vocab_size": 120}})
    rows = make_split("train", train_size=10, eval_size=2)
    torch.manual_seed(0)
    model, tok = load_student(cfg.student, [r["input"] for r in rows] + [r["label"] for r in rows])
    path = save_student(model, tok, tmp_path_factory.mktemp("student"))
    return model, path, [(r["id"], r["input"]) for r in rows]


def test_every_negative_is_tagged_with_its_lagged_snapshot(ray_session, tiny_student):
    ray = ray_session
    model, path, examples = tiny_student
    store = SnapshotStore.remote(j=1)
    cfg = SnapshotConfig(j=1, max_new_tokens=8, sampler_actors=2, sampler_num_cpus=0.25)
    pool = NegativePool.start(str(path), store, examples, cfg, seed=0)
    try:
        pool.request(1)  # asked for before any snapshot exists: the sampler waits for round 0's publish
        # the trainer's order: publish a round's student, collect the negatives sampled from the lagged one
        for r in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05)  # each round's student differs
            ray.get(store.publish.remote(r, cpu_state_dict(model)))
            if r == 0:
                first = pool.fetch(1)
                assert sorted(first) == sorted(i for i, _ in examples)  # one negative per example, both actors
                assert {snap for _, snap in first.values()} == {0}  # round 1 - j
        third = pool.fetch(3)
        assert {snap for _, snap in third.values()} == {2}
        assert all(isinstance(text, str) for text, _ in third.values())
        assert pool.fetch(3) == third  # a round's negatives are sampled once and shared by every rank
        # 8 new tokens are too few for this student to finish: the pool counts the cut-off outputs
        assert 0 < pool.last_fetch_cut_off <= len(examples)
    finally:
        pool.shutdown()
        ray.kill(store)


def test_most_negatives_cut_off_after_the_first_snapshot_is_a_warning(caplog):
    from types import SimpleNamespace

    from qcrd_ray.config import Config
    from qcrd_ray.train.loop import _check_cut_off

    cfg = Config()
    pool = SimpleNamespace(last_fetch_cut_off=3)
    initial = {f"e{i}": ("text", 0) for i in range(4)}
    lagged = {f"e{i}": ("text", 2) for i in range(4)}
    with caplog.at_level("WARNING", logger="qcrd_ray.train.loop"):
        assert _check_cut_off(pool, initial, cfg) == 0.75  # the untrained student: expected, no warning
        assert not caplog.records
        assert _check_cut_off(pool, lagged, cfg) == 0.75
    assert "75 % of the student negatives were cut off at snapshots.max_new_tokens=64" in caplog.text
    pool.last_fetch_cut_off = 1
    caplog.clear()
    assert _check_cut_off(pool, lagged, cfg) == 0.25 and not caplog.records
