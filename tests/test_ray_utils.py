"""init_ray: the Ray a command starts is usable next to another Ray on the same machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from qcrd_ray.testing import patience

# A driver in its own process (one process holds one Ray): starts its Ray the way every qcrd command does, then
# asks Ray's state API, from inside a worker and without an address, about an actor of its own cluster. This is
# what Ray Train's placement-group cleaner does every second to see whether the training controller is alive.
PROBE = textwrap.dedent("""
    import ray
    from qcrd_ray.ray_utils import init_ray

    init_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    class Alive:
        def ping(self):
            return True

    @ray.remote(num_cpus=0)
    def state_of(actor_id):
        from ray.util.state import get_actor
        from qcrd_ray.testing import patience
        actor = get_actor(actor_id, timeout=patience(30))
        return actor.state if actor else "not found"

    alive = Alive.remote()
    ray.get(alive.ping.remote())
    print("STATE", ray.get(state_of.remote(alive._actor_id.hex())))
""")


@pytest.mark.ray
def test_workers_query_their_own_cluster_with_another_ray_on_the_machine(ray_session, tmp_path):
    """Before: with the test session's Ray also running, the worker's state API call failed ("Found multiple
    active Ray instances") or, with a `ray start` cluster on the machine, asked that cluster, did not find the
    controller and Ray Train removed the live run's placement group ("Destroying worker since its placement
    group was removed")."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=patience(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STATE ALIVE" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("quiet", [True, False])
def test_raylet_startup_notice_goes_to_the_workers_log_not_the_console(quiet, monkeypatch, capsys, caplog):
    """A sweep's console was flooded by "(raylet) WARNING: 12 PYTHON worker processes have been started ..."
    (fractional-CPU actors on 2 cores); a raylet message that matters (a worker killed for memory) still prints."""
    from ray._private import worker as ray_worker

    from qcrd_ray import console, ray_utils

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    ray_utils._route_raylet_messages(ray_worker, quiet)
    ray_utils._route_raylet_messages(ray_worker, quiet)  # a second init_ray wraps the original, not the wrapper
    notice = f"WARNING: 12 PYTHON worker processes have been started on node: {quiet} with address: 10.0.0.1"
    # Ray prints a line repeated across processes within seconds once, "[repeated Nx]": a line of its own per case
    oom = f"Task was killed due to the node running low on memory (case quiet={quiet})."
    with caplog.at_level("INFO", logger=console.WORKER_LOGGER):
        for line in (notice, oom):
            ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert oom in out
    assert (notice in out) is not quiet
    assert out.count(oom) == 1
    logged = [r.getMessage() for r in caplog.records if r.name == console.WORKER_LOGGER]
    assert logged == [f"(raylet) out: {notice}", f"(raylet) out: {oom}"]


def test_a_dead_cluster_address_is_named_within_seconds_and_no_address_starts_a_local_ray():
    """`--address` / RAY_ADDRESS pointing at nothing fails at once naming it (Ray alone retries for minutes);
    without an address a local Ray is started explicitly (a bare ray.init() would join the cluster the last
    `ray start` recorded, even a dead one)."""
    import time

    from qcrd_ray.ray_utils import ClusterUnreachable, check_reachable
    from qcrd_ray.testing import free_port

    dead = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=f"no Ray cluster answers at {dead}"):
        check_reachable(dead, timeout_s=5.0)
    assert time.monotonic() - start < 5.0 + patience(5.0)  # its own 5 s, and slack for a busy machine
    check_reachable("auto"), check_reachable("ray://head:10001")  # left to Ray
    code = ("import os, ray; from qcrd_ray import ray_utils; calls = [];"
            "ray.init = lambda **kw: calls.append(kw); ray_utils._route_ray_output = lambda quiet: None;"
            "ray_utils.init_ray(); print(calls[0]['address'])")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=patience(120))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "local"


def test_a_recovery_notice_from_any_worker_reaches_the_console_in_one_line(capsys):
    """Ray Train's controller (FailureNotices) says a worker was lost and what happens next; the tagged line it
    prints reaches the driver through Ray's log forwarding and is shown as a summary line, ip included, besides
    going to workers.log like any worker line."""
    import io
    import logging

    from qcrd_ray import console, ray_utils
    from qcrd_ray.train.trainer import FailureNotices

    notices = FailureNotices(max_failures=3)
    notices.after_exception(None, {1: RuntimeError("The actor died unexpectedly before finishing this task.\nmore")})
    notices.after_exception(None, {0: OSError("x"), 1: OSError("y")})
    for _ in range(2):
        notices.after_exception(None, {0: OSError("x")})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (console.NOTICE_TAG + "train worker rank 1 lost (RuntimeError: The actor died unexpectedly "
                          "before finishing this task.); restarting the workers from the latest checkpoint (1 of 3 "
                          "failures used)")
    assert "rank 0, 1 lost" in printed[1] and "(2 of 3 failures used)" in printed[1]
    assert printed[3].endswith("train.max_failures=3 spent: the run stops (rerun it to resume)")

    out, err = io.StringIO(), io.StringIO()
    with console.session(out=out, err=err):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger(console.WORKER_LOGGER).addHandler(handler)
        try:
            ray_utils._log_worker_lines({"pid": 77, "ip": "10.0.0.7", "actor_name": "TrainController",
                                         "lines": [printed[0], "an ordinary line"]})
        finally:
            logging.getLogger(console.WORKER_LOGGER).removeHandler(handler)
    assert out.getvalue().splitlines() == [printed[0][len(console.NOTICE_TAG):] + " [ip 10.0.0.7]"]
    assert len(records) == 2  # both lines are in workers.log


AUTOSCALER_REPORT = """\
2026-12-06 09:34:46,853	INFO autoscaler.py:147 -- The autoscaler took 0.0 seconds to fetch the list of non-terminated nodes.
2026-12-06 09:34:46,853	INFO autoscaler.py:408 --
======== Autoscaler status: 2026-12-06 09:34:46.853738 ========
Node status
---------------------------------------------------------------
Active:
 1 node_07eedc27c55671a17e5b93c8161a7c26beb93a93a10fa7d701d15592
Resources
 0.75/2.0 CPU
Pending Demands:
 (no resource demands)
2026-12-06 09:34:46,857	INFO autoscaler.py:469 -- The autoscaler took 0.004 seconds to complete the update iteration.""".splitlines()


def test_the_autoscalers_periodic_status_stays_out_of_the_workers_log_its_events_do_not(caplog):
    """Every 5 s the autoscaler printed the same ~25-line table, which buried the workers' lines in workers.log.
    Whatever batches Ray's log monitor cuts the report into, none of it is logged; a launch event is."""
    from qcrd_ray import console, ray_utils

    event = "Adding 1 node(s) of type worker."
    lines = [*AUTOSCALER_REPORT, event, *AUTOSCALER_REPORT]
    with caplog.at_level("INFO", logger=console.WORKER_LOGGER):
        for start in range(0, len(lines), 4):  # batches that cut the report anywhere
            ray_utils._log_worker_lines({"pid": "autoscaler", "ip": "10.0.0.1", "lines": lines[start:start + 4]})
        ray_utils._log_worker_lines({"pid": 5, "ip": "10.0.0.1", "actor_name": "W", "lines": ["Active:"]})
    logged = [r.getMessage() for r in caplog.records if r.name == console.WORKER_LOGGER]
    assert logged == [f"(worker pid=autoscaler, ip=10.0.0.1) out: {event}", "(W pid=5, ip=10.0.0.1) out: Active:"]
