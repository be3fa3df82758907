"""A teacher actor SIGKILLed mid-`qcrd teach` (its PID from Ray's state API, no exception planted in the code): Ray
restarts it, the batches it held run again, and the output holds every example exactly once with all K samples.

The teacher is the http backend against a real OpenAI-compatible server on loopback that holds every request after
the first few until the kill is done, so the kill always lands with batches in flight, however loaded the machine."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import pytest

from qcrd_ray import storage
from qcrd_ray.config import Config
from qcrd_ray.teacher.pipeline import iter_teacher_rows, run_teacher
from qcrd_ray.teacher.shards import MANIFEST
from qcrd_ray.testing import HoldingTeacher, patience

pytestmark = pytest.mark.ray

GOOD = "<Explanation>: I add the two numbers together. <Answer>: 8"
ANSWER_FREELY = 6  # requests answered before the server starts holding them for the kill
WAIT_S = patience(120.0)  # bound on every wait below (a restart takes seconds; the machine is shared)
EXAMPLES, K = 24, 2


@pytest.fixture()
def holding_server():
    server = HoldingTeacher(GOOD, answer_freely=ANSWER_FREELY, hold_s=WAIT_S)
    yield server
    server.close()


def teacher_actors(address: str, detail: bool = False, **filters) -> list:
    """The teacher pool's actors known to this session's cluster, in any state unless ``filters`` narrow it;
    ``detail`` adds the fields the short listing leaves out (the restart count)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[(key, "=", value) for key, value in filters.items()],
                         detail=detail, raise_on_missing_output=False)
    return [a for a in actors if "MapWorker" in a.class_name]


def kill_one_teacher_actor(server, figures: dict, run_done: threading.Event) -> None:
    """Wait until both actors hold a request, SIGKILL one, let the server answer again, then time the restart while
    the run lasts. Seeing the new process is best effort: a restarted actor can finish the last batches and be
    torn down with the pool between two polls, so the test reads the restart count from Ray afterwards."""
    import ray

    address = ray.get_runtime_context().gcs_address  # this session's cluster only
    try:
        for _ in range(2):  # two requests held: both actors of the pool are mid-batch
            assert server.held.acquire(timeout=WAIT_S), "the teacher pool never reached the server"
        deadline = time.monotonic() + WAIT_S
        while len(actors := [a for a in teacher_actors(address, state="ALIVE") if a.pid]) < 2:
            assert time.monotonic() < deadline, f"two live teacher actors never showed: {actors}"
            time.sleep(0.2)
        victim = actors[0]
        figures["requests_at_kill"] = server.requests
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        figures["killed"] = victim
        server.resume()
        while not run_done.is_set() and time.monotonic() < deadline:
            again = teacher_actors(address, actor_id=victim.actor_id)
            if any(a.state == "ALIVE" and a.pid and a.pid != victim.pid for a in again):
                figures["restart_s"] = time.monotonic() - killed_at
                break
            time.sleep(0.1)
    finally:
        server.resume()  # never leave the run hanging on a failed assertion here


def test_a_killed_teacher_actor_is_restarted_and_every_example_arrives_exactly_once(
        ray_session, holding_server, tmp_path):
    cfg = Config().replace(
        data={"synthetic_train_size": EXAMPLES},
        teacher={"backend": "http", "model": "m", "base_url": holding_server.base_url,
                 "k": K, "shard_rows": 6, "batch_size": 2, "min_actors": 2, "max_actors": 2, "num_cpus": 0.25,
                 "max_concurrency": 1, "timeout_s": WAIT_S, "max_retries": 0},
    )
    figures: dict = {}
    run_done = threading.Event()
    killer = threading.Thread(target=kill_one_teacher_actor, args=(holding_server, figures, run_done), daemon=True)
    killer.start()
    started = time.monotonic()
    try:
        summary = run_teacher(cfg, tmp_path)
    finally:
        run_done.set()
    elapsed = time.monotonic() - started
    killer.join(timeout=WAIT_S)

    assert "killed" in figures, "no teacher actor was killed"
    assert figures["requests_at_kill"] < EXAMPLES * K  # the kill landed mid-run
    victim = figures["killed"]  # Ray's record of it outlives the pool: the restart count is there whenever it ended
    records = teacher_actors(ray_session.get_runtime_context().gcs_address, detail=True, actor_id=victim.actor_id)
    assert records and records[0].num_restarts >= 1, f"the killed actor was not restarted: {records}"
    attempts = holding_server.attempts
    assert max(attempts.values()) >= 2  # the killed actor's batch was sent again

    rows = list(iter_teacher_rows(tmp_path))
    ids = [r["id"] for r in rows]
    recorded = json.loads(storage.read_text(tmp_path / MANIFEST))
    assert len(ids) == len(set(ids)) == recorded["examples"] == EXAMPLES
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest() == recorded["ids_sha256"]
    for row in rows:  # every sample exactly once, answered (not an error left by the kill)
        assert [s["index"] for s in row["samples"]] == list(range(K)), row["id"]
        assert {s["status"] for s in row["samples"]} == {"ok"}, row["samples"]
    assert summary["samples"] == EXAMPLES * K and summary["request_failures"] == 0
    duplicated = sum(n - 1 for n in attempts.values())
    restart = f"{figures['restart_s']:.1f}s" if "restart_s" in figures else "(not seen: it ended between polls)"
    print(f"\nteacher actor kill: requests at kill {figures['requests_at_kill']}/{EXAMPLES * K}, actor restarted in "
          f"{restart}, {duplicated} requests resent, 0 rows lost or duplicated, run {elapsed:.1f}s")
