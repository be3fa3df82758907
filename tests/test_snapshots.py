"""SnapshotStore: which snapshot feeds which round, the ring's size, persistence (local path or s3://) and restore.
Restarts after a kill: tests/test_faults_actors.py."""

from __future__ import annotations

import uuid

import pytest
import torch

from qcrd_ray import storage
from qcrd_ray.actors.snapshots import (
    SnapshotStore, persisted_rounds, rounds_to_keep, snapshot_bytes, snapshot_path, source_round,
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


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path, s3_server):
    """Where the store persists: a local folder, or a fresh prefix in the test S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "snapshots")
    return f"{s3_server}/{uuid.uuid4().hex[:8]}/train/snapshots"


def test_persisted_snapshot_round_trips_tied_weights(tmp_path):
    from safetensors.torch import load

    emb = torch.arange(6.0).reshape(2, 3)
    data = snapshot_bytes({"shared.weight": emb, "lm_head.weight": emb, "b": torch.tensor([1.0])})  # tied: T5
    storage.write_bytes(snapshot_path(tmp_path, 7), data)
    assert persisted_rounds(tmp_path) == [7] and persisted_rounds(tmp_path / "absent") == []
    back = load(storage.read_bytes(snapshot_path(tmp_path, 7)))
    assert torch.equal(back["shared.weight"], emb) and torch.equal(back["lm_head.weight"], emb)


@pytest.mark.ray
def test_store_persists_through_storage_and_a_new_store_reloads_the_ring(ray_session, location):
    ray = ray_session
    store = SnapshotStore.remote(j=2, location=location)
    for r in range(5):
        held = ray.get(store.publish.remote(r, _state(float(r))))
    assert held == [2, 3, 4]
    assert persisted_rounds(location) == [2, 3, 4]  # pruning deletes through storage too
    snap_round, ref = ray.get(store.get.remote(5))  # round 5 trains against the student of round 3
    assert snap_round == 3
    assert torch.equal(ray.get(ref)["w"], torch.full((3,), 3.0))
    ray.kill(store)

    # A new store (a rerun's driver) holds what was persisted, without being asked.
    store = SnapshotStore.remote(j=2, location=location)
    assert ray.get(store.rounds.remote()) == [2, 3, 4]
    # Resumed at round 4 (the checkpoint's student is republished as round 4): rounds > 3 are stale.
    assert ray.get(store.restore.remote(3)) == [2, 3]
    assert persisted_rounds(location) == [2, 3]
    snap_round, ref = ray.get(store.get.remote(4))
    assert snap_round == 2 and torch.equal(ray.get(ref)["b"], torch.tensor([2.0]))
    # A fresh start (no checkpoint) forgets them all.
    assert ray.get(store.restore.remote(-1)) == [] and persisted_rounds(location) == []
    ray.kill(store)


@pytest.mark.ray
def test_new_store_drops_a_round_a_killed_publish_left_beyond_the_ring(ray_session, tmp_path):
    ray = ray_session
    for r in range(4):  # a store killed after writing round 3 but before pruning round 0
        storage.write_bytes(snapshot_path(tmp_path, r), snapshot_bytes(_state(float(r))))
    (tmp_path / ".round_0004.safetensors.tmp-1-abc").write_bytes(b"torn")  # killed mid-write
    store = SnapshotStore.remote(j=2, location=str(tmp_path))
    assert ray.get(store.rounds.remote()) == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"round_000{r}.safetensors" for r in (1, 2, 3)]
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
