"""Faults of the snapshot store and the negative samplers, injected for real: the actor's process is found through
Ray's state API and SIGKILLed. A killed actor must come back by itself (Ray's restart) with its state reloaded
(the store's ring from storage, a sampler's student from the object store) and the round's negatives must still
arrive; an actor gone for good must cost the negatives of its examples only, counted, never a hang."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import uuid

import pytest
import torch

from qcrd_ray import storage
from qcrd_ray.config import SnapshotConfig, from_dict
from qcrd_ray.data.synthetic import make_split
from qcrd_ray.actors.sampler import NegativePool
from qcrd_ray.actors.snapshots import SnapshotStore, cpu_state_dict, persisted_rounds, snapshot_store
from qcrd_ray.students import load_student, save_student
from qcrd_ray.testing import patience

pytestmark = pytest.mark.ray

WAIT_S = patience(120.0)  # a hang guard on every wait below, not a speed target (restarts are slow on a busy machine)


def actor_pid(actor, not_pid: int | None = None) -> int:
    """The PID of ``actor``'s live process from Ray's state API; polls until the actor is ALIVE in a process
    other than ``not_pid`` (a restart). The filter on the actor id keeps this to our own actor."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this session's cluster, never another one on the machine
    actor_id = actor._actor_id.hex()
    deadline = time.monotonic() + WAIT_S
    while True:
        states = list_actors(address=address, filters=[("actor_id", "=", actor_id)], raise_on_missing_output=False)
        if states and states[0].state == "ALIVE" and states[0].pid and states[0].pid != not_pid:
            return states[0].pid
        if time.monotonic() > deadline:
            raise AssertionError(f"actor {actor_id} not alive (in a new process) within {WAIT_S}s: {states}")
        time.sleep(0.1)


def kill(actor) -> int:
    """SIGKILL the actor's process (no exception inside the actor, no chance to clean up); returns its PID."""
    pid = actor_pid(actor)
    os.kill(pid, signal.SIGKILL)
    return pid


def fetch_bounded(pool: NegativePool, round_index: int):
    """``pool.fetch`` that fails the test instead of hanging it."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(pool.fetch, round_index).result(timeout=WAIT_S)


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value), "b": torch.tensor([value])}


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path, s3_server):
    if request.param == "local":
        return str(tmp_path / "snapshots")
    return f"{s3_server}/{uuid.uuid4().hex[:8]}/train/snapshots"


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    cfg = from_dict({"student": {"tiny_d_model": 16, "tiny_d_ff": 32, "tiny_layers": 1, "tiny_heads": 2,
                                 "tiny_vocab_size": 120}})
    rows = make_split("train", train_size=10, eval_size=2)
    torch.manual_seed(0)
    model, tok = load_student(cfg.student, [r["input"] for r in rows] + [r["label"] for r in rows])
    path = save_student(model, tok, tmp_path_factory.mktemp("student"))
    return model, path, [(r["id"], r["input"]) for r in rows]


def _sampler_cfg(restarts: int, j: int = 1) -> SnapshotConfig:
    return SnapshotConfig(j=j, max_new_tokens=8, sampler_actors=2, sampler_num_cpus=0.25, actor_restarts=restarts)


def test_killed_store_restarts_with_its_ring_reloaded_from_storage(ray_session, location):
    ray = ray_session
    name = f"qcrd-snapshots-test-{uuid.uuid4().hex[:8]}"
    store = snapshot_store(name, j=2, location=location)
    for r in range(5):
        ray.get(store.publish.remote(r, _state(float(r))))
    killed = kill(store)

    # the caller's handle reaches the restarted store: the call waits for it and is answered from storage
    snap_round, ref = ray.get(store.get.remote(5), timeout=WAIT_S)
    assert snap_round == 3 and torch.equal(ray.get(ref)["w"], torch.full((3,), 3.0))
    assert actor_pid(store, not_pid=killed) != killed  # a new process, not the old one answering
    assert ray.get(ray.get_actor(name).rounds.remote()) == [2, 3, 4]  # found by name, as samplers find it
    # training goes on: the next publish is persisted and prunes round 2 from storage
    assert ray.get(store.publish.remote(5, _state(5.0))) == [3, 4, 5]
    assert persisted_rounds(location) == [3, 4, 5]
    ray.kill(store)


def test_killed_sampler_restarts_and_the_rounds_negatives_arrive(ray_session, tiny_student, s3_server):
    ray = ray_session
    model, path, examples = tiny_student
    uri = f"{s3_server}/{uuid.uuid4().hex[:8]}/train/init_model"  # the initial student as a run stores it
    storage.upload_dir(path, uri)
    store = SnapshotStore.remote(j=1)
    pool = NegativePool.start(uri, store, examples, _sampler_cfg(restarts=2), seed=0)
    try:
        pool.request(1)  # in flight on both actors: they wait for snapshot 0
        killed = kill(pool.actors[0])
        ray.get(store.publish.remote(0, cpu_state_dict(model)))
        first = fetch_bounded(pool, 1)
        assert pool.last_fetch_missing == 0
        assert sorted(first) == sorted(i for i, _ in examples)  # the killed actor's examples too
        assert {snap for _, snap in first.values()} == {0}
        assert actor_pid(pool.actors[0], not_pid=killed) != killed

        # killed after it sampled: its restart samples the round again from the same snapshot and seed
        kill(pool.actors[1])
        assert fetch_bounded(pool, 1) == first and pool.last_fetch_missing == 0
    finally:
        pool.shutdown()
        ray.kill(store)


def test_killed_store_restarts_and_samplers_still_get_their_snapshot(ray_session, tiny_student, tmp_path):
    ray = ray_session
    model, path, examples = tiny_student
    store = snapshot_store(f"qcrd-snapshots-test-{uuid.uuid4().hex[:8]}", j=1, location=str(tmp_path))
    pool = NegativePool.start(str(path), store, examples, _sampler_cfg(restarts=2), seed=0)
    try:
        for r in range(2):
            ray.get(store.publish.remote(r, cpu_state_dict(model)))
        assert {snap for _, snap in fetch_bounded(pool, 1).values()} == {0}
        kill(store)
        second = fetch_bounded(pool, 2)  # snapshot 1, which only storage still holds
        assert pool.last_fetch_missing == 0 and len(second) == len(examples)
        assert {snap for _, snap in second.values()} == {1}
    finally:
        pool.shutdown()
        ray.kill(store)


def test_sampler_lost_for_good_costs_only_its_examples_counted(ray_session, tiny_student):
    ray = ray_session
    model, path, examples = tiny_student
    store = SnapshotStore.remote(j=0)
    pool = NegativePool.start(str(path), store, examples, _sampler_cfg(restarts=0, j=0), seed=0)
    try:
        ray.get(store.publish.remote(0, cpu_state_dict(model)))
        kill(pool.actors[1])  # no restart left
        negatives = fetch_bounded(pool, 0)
        assert sorted(negatives) == sorted(i for i, _ in examples[0::2])  # actor 0's shard
        assert pool.last_fetch_missing == pool.shard_sizes[1] == 5
    finally:
        pool.shutdown()
        ray.kill(store)


def test_store_lost_for_good_leaves_every_example_missing_not_hanging(ray_session, tiny_student):
    ray = ray_session
    model, path, examples = tiny_student
    store = snapshot_store(f"qcrd-snapshots-test-{uuid.uuid4().hex[:8]}", j=0, max_restarts=0)
    pool = NegativePool.start(str(path), store, examples, _sampler_cfg(restarts=2, j=0), seed=0)
    try:
        ray.get(store.publish.remote(0, cpu_state_dict(model)))
        kill(store)
        assert fetch_bounded(pool, 0) == {}  # the loop trains this round on teacher negatives
        assert pool.last_fetch_missing == len(examples)
    finally:
        pool.shutdown()
