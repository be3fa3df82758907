"""SnapshotStore: which snapshot feeds which round, the ring's size, persistence and restore."""

from __future__ import annotations

import pytest
import torch

from qcrd_ray.qcrd.snapshots import (
    SnapshotStore, persisted_rounds, rounds_to_keep, source_round,
)


def test_source_round_lags_j_rounds_and_falls_back_to_the_oldest():
    assert source_round(7, 5, range(2, 8)) == 2
    assert source_round(3, 5, [0, 1, 2, 3]) == 0  # before round j: the initial student
    assert source_round(1, 0, [0, 1]) == 1  # j = 0: the current student
    assert source_round(6, 2, [0, 4, 5, 6], neg_source="fixed") == 0


def test_source_round_refuses_a_snapshot_not_yet_published_or_already_evicted():
    with pytest.raises(LookupError):
        source_round(4, 0, [0, 1, 2, 3])
    with pytest.raises(LookupError):
        source_round(0, 1, [])
    with pytest.raises(ValueError, match="left the ring"):
        source_round(3, 2, [2, 3])


def test_ring_keeps_j_plus_one_rounds_and_round_zero_when_fixed():
    assert rounds_to_keep(range(8), 2) == [5, 6, 7]
    assert rounds_to_keep(range(8), 2, "fixed") == [0, 5, 6, 7]
    assert rounds_to_keep([0, 1], 5) == [0, 1]


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value), "b": torch.tensor([value])}


@pytest.mark.ray
def test_store_serves_the_lagged_snapshot_and_survives_restart_from_disk(ray_session, tmp_path):
    ray = ray_session
    store = SnapshotStore.remote(j=2, persist_dir=str(tmp_path))
    for r in range(5):
        held = ray.get(store.publish.remote(r, _state(float(r))))
    assert held == [2, 3, 4]
    assert persisted_rounds(tmp_path) == [2, 3, 4]
    snap_round, ref = ray.get(store.get.remote(5))  # round 5 trains against the student of round 3
    assert snap_round == 3
    assert torch.equal(ray.get(ref)["w"], torch.full((3,), 3.0))
    ray.kill(store)

    # A resumed run at round 4 (the checkpoint's student is republished as round 4): rounds > 3 on disk are stale.
    store = SnapshotStore.remote(j=2, persist_dir=str(tmp_path))
    assert ray.get(store.restore.remote(3)) == [2, 3]
    assert persisted_rounds(tmp_path) == [2, 3]
    snap_round, ref = ray.get(store.get.remote(4))
    assert snap_round == 2 and torch.equal(ray.get(ref)["b"], torch.tensor([2.0]))
    ray.kill(store)


@pytest.mark.ray
def test_snapshot_outlives_the_process_that_published_it(ray_session):
    ray = ray_session
    store = SnapshotStore.remote(j=1)

    @ray.remote(num_cpus=0)
    class Worker:
        def publish(self, store):  # builds its tensors itself: workers cannot import this test module
            ray.get(store.publish.remote(0, {"w": torch.full((3,), 1.5)}))

    worker = Worker.remote()
    ray.get(worker.publish.remote(store))
    ray.kill(worker)  # a trainer worker dying must not take the snapshot with it
    _, ref = ray.get(store.get.remote(0))
    assert torch.equal(ray.get(ref)["w"], torch.full((3,), 1.5))
    ray.kill(store)
