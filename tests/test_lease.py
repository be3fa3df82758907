"""One driver per run (issue 22 item 1): the run lease's decisions (pure), the lease on a folder in this process,
and real drivers racing for one location: `qcrd run` on a local path, `qcrd teach` on S3."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qcrd_ray import lease, storage
from qcrd_ray.lease import Lease, LeaseHeld, LeaseLost
from qcrd_ray.testing import patience

NOW = 1_700_000_000.0
HERE = socket.gethostname()


def record(**changes) -> dict:
    return {"host": "node-7", "pid": 4242, "token": "t", "command": "qcrd run", "started": NOW - 600,
            "heartbeat": NOW - 3, **changes}


# ---------------------------------------------------------------------------------------------- decisions


def test_a_lease_is_live_until_its_heartbeat_is_older_than_the_stale_limit():
    assert lease.state(None, NOW) == "free"
    assert lease.state(record(), NOW, stale_after_s=40) == "live"
    assert lease.state(record(heartbeat=NOW - 40), NOW, stale_after_s=40) == "live"
    assert lease.state(record(heartbeat=NOW - 41), NOW, stale_after_s=40) == "stale"
    assert lease.state({}, NOW) == "stale"  # unreadable: nobody can be shown to hold it
    assert lease.state(record(heartbeat="soon"), NOW) == "stale"


def test_a_holder_on_this_host_whose_process_is_gone_is_dead_at_once():
    """A driver killed with SIGKILL cannot release its lease; rerun on the same host, it need not wait."""
    fresh = record(host="me")
    assert lease.state(fresh, NOW, host="me", alive=lambda pid: False) == "dead"
    assert lease.state(fresh, NOW, host="me", alive=lambda pid: True) == "live"
    # another host's process cannot be checked from here: only its heartbeat tells
    assert lease.state(fresh, NOW, host="other", alive=lambda pid: False) == "live"
    assert lease.pid_alive(os.getpid())


def test_the_refusal_is_one_line_naming_the_holder_and_how_to_take_over():
    line = lease.refusal("s3://b/run", record(), NOW, stale_after_s=40)
    assert "\n" not in line
    for part in ("s3://b/run", "qcrd run on host node-7", "pid 4242", "since 2023-11-14 22:03:20 UTC",
                 "last heartbeat 3 s ago", "--force", "40 s without a heartbeat"):
        assert part in line, (part, line)


def test_a_new_record_names_this_process_with_a_fresh_token():
    a, b = lease.new_record("qcrd teach", NOW), lease.new_record("qcrd teach", NOW)
    assert (a["host"], a["pid"], a["command"], a["started"], a["heartbeat"]) == (HERE, os.getpid(), "qcrd teach",
                                                                                NOW, NOW)
    assert a["token"] != b["token"] and len(a["token"]) == 32


# ---------------------------------------------------------------------------------------------- in this process


FAST = dict(heartbeat_s=0.05, stale_after_s=5.0, confirm_s=0.0)


def _write(folder, rec: dict) -> None:
    storage.write_json(storage.join(str(folder), lease.LEASE_FILE), rec)


def test_a_second_holder_is_refused_then_takes_over_with_force_and_the_first_one_learns_it(tmp_path, caplog):
    lost = threading.Event()
    first = Lease(tmp_path, "qcrd run", on_lost=lost.set, **FAST)
    first.acquire()
    assert first.read()["token"] == first.record["token"]
    with pytest.raises(LeaseHeld, match=rf"in use by qcrd run on host {HERE}, pid {os.getpid()}, since .*--force"):
        Lease(tmp_path, "qcrd run", **FAST).acquire()
    second = Lease(tmp_path, "qcrd run", on_lost=lambda: None, **FAST)
    with caplog.at_level(logging.WARNING, logger="qcrd_ray.lease"):
        second.acquire(force=True)
    assert "--force: taking over" in caplog.text
    assert lost.wait(5), "the first holder's heartbeat did not notice the takeover"
    assert "was taken over by qcrd run on host" in first.lost
    first.release()  # a lost lease is not the first one's to remove
    assert first.read()["token"] == second.record["token"]
    time.sleep(0.2)
    assert second.read()["heartbeat"] > second.record["started"]  # the heartbeat goes on
    second.release()
    assert not (tmp_path / lease.LEASE_FILE).exists()


def test_a_stale_lease_is_taken_over_with_a_message_saying_so(tmp_path, caplog):
    _write(tmp_path, record(heartbeat=time.time() - 3600))
    with caplog.at_level(logging.WARNING, logger="qcrd_ray.lease"):
        with lease.held(tmp_path, "qcrd teach", **FAST) as held:
            assert held.read()["token"] == held.record["token"]
    assert "taking over the stale lease of" in caplog.text and "node-7" in caplog.text
    assert not (tmp_path / lease.LEASE_FILE).exists()


def test_a_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write(tmp_path, record(host=HERE, pid=int(gone.stdout), heartbeat=time.time()))
    with caplog.at_level(logging.WARNING, logger="qcrd_ray.lease"):
        with lease.held(tmp_path, "qcrd run", **FAST):
            pass
    assert "is no longer running" in caplog.text


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_driver_whose_lease_is_taken_over_is_stopped_with_lease_lost(tmp_path, monkeypatch, sigint):
    """The heartbeat thread interrupts the main thread; `held` turns that into LeaseLost, whatever the block was
    doing (here: waiting, as a driver waits on Ray). Also in a process that ignores SIGINT, as one started in the
    background by a shell does: a Ctrl-C still does nothing to it, a lost lease stops it, and it is never sent the
    SIGTERM that aborts a Ray driver at exit."""
    terminated, kill = [], os.kill  # (os.kill(pid, 0) is how a lease asks whether its holder still runs)
    monkeypatch.setattr(lease.os, "kill",  # a SIGTERM would end pytest
                        lambda pid, sig: terminated.append(sig) if sig == signal.SIGTERM else kill(pid, sig))
    # (set either way: pytest itself may run with SIGINT ignored, started in the background)
    handler = signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler
    previous = signal.signal(signal.SIGINT, handler)
    taker = Lease(tmp_path, "qcrd train", on_lost=lambda: None, **FAST)
    try:
        with pytest.raises(LeaseLost, match="was taken over by .*this driver stopped"):
            with lease.held(tmp_path, "qcrd run", **FAST):
                if sigint == "ignored":
                    signal.raise_signal(signal.SIGINT)  # the terminal's Ctrl-C: still ignored
                taker.acquire(force=True)
                time.sleep(patience(10))  # interrupted long before
        assert signal.getsignal(signal.SIGINT) is handler  # the lease's own handler is gone with the lease
        assert terminated == []
        assert (tmp_path / lease.LEASE_FILE).exists()  # the new holder's, left in place
    finally:
        signal.signal(signal.SIGINT, previous)
        # its heartbeat would otherwise write every FAST heartbeat for the rest of the session, through storage
        # functions that later tests patch
        taker.release()


def test_of_two_drivers_taking_a_free_lease_at_once_exactly_one_gets_it(tmp_path):
    """No compare-and-swap: write, wait, re-read. The one whose write landed last keeps it."""
    barrier, results = threading.Barrier(2), []

    def take(name):
        held = Lease(tmp_path, name, heartbeat_s=60, confirm_s=0.3)
        barrier.wait()
        try:
            held.acquire()
            results.append(("ok", held))
        except LeaseHeld as e:
            results.append(("refused", str(e)))

    threads = [threading.Thread(target=take, args=(f"driver {i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["ok", "refused"], results
    [winner] = [r[1] for r in results if r[0] == "ok"]
    assert winner.read()["token"] == winner.record["token"]
    winner.release()


# ---------------------------------------------------------------------------------------------- real drivers

QCRD = str(Path(sys.executable).parent / "qcrd")
# the smallest run that goes through every stage: a few rows, one round of two steps of a one-layer student
TINY = [
    "--set", "data.synthetic_train_size=16", "--set", "data.synthetic_eval_size=4",
    "--set", "teacher.k=2", "--set", "teacher.shard_rows=16", "--set", "train.rounds=1",
    "--set", "train.round_steps=2", "--set", "train.batch_size=4", "--set", "train.num_workers=1",
    "--set", "student.max_target_len=32", "--set", "student.tiny_d_model=32", "--set", "student.tiny_d_ff=64",
    "--set", "student.tiny_layers=1", "--set", "student.tiny_vocab_size=400",
]
ARGS = {"run": ["--methods", "finetune", *TINY], "teach": TINY}
WAIT_S = patience(600.0)  # a bound, not a duration: a loaded 2-core machine starts Ray slowly
REFUSED_WITHIN_S = patience(60.0)  # the second driver reads the lease and leaves, before Ray or any stage starts
HEARTBEAT_S = 0.5  # the first driver's heartbeat: a takeover stops it within this, not within lease.HEARTBEAT_S

# The first driver: the real CLI (qcrd_ray.cli.main, what the `qcrd` script runs) with two test hooks on the
# lease it takes. Once it holds the lease it waits, heartbeating, until the gate file exists: the window in which
# the test runs a second driver is opened and closed on purpose, whatever the machine's speed. And it heartbeats
# every HEARTBEAT_S (the Lease's timings are arguments for this), still going stale only after the default.
DRIVER = f"""
import contextlib, os, sys, time
from qcrd_ray import lease
from qcrd_ray.cli import main

held, gate = lease.held, sys.argv[1]

@contextlib.contextmanager
def gated(*args, **kwargs):
    with held(*args, heartbeat_s={HEARTBEAT_S}, stale_after_s=lease.STALE_AFTER_S, **kwargs) as taken:
        while not os.path.exists(gate):
            time.sleep(0.05)
        yield taken

lease.held = gated
sys.exit(main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    # each driver starts its own local Ray (never the session's); the S3 variables come from s3_server
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _start(command: str, out: str, gate: Path, *extra: str) -> subprocess.Popen:
    """The first driver, held at the gate once it has the lease (until ``gate`` exists)."""
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(gate), command, "--out", out, *ARGS[command], *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _holder(out: str) -> dict | None:
    return Lease(out).read()


def _wait_for(condition, driver: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if driver.poll() is not None or time.monotonic() > deadline:
            if driver.poll() is None:
                os.killpg(driver.pid, 9)
            out, err = driver.communicate(timeout=patience(60))
            pytest.fail(f"{what} never happened (driver exit {driver.returncode}): {out[-2000:]}{err[-3000:]}")
        time.sleep(0.1)


def _finish(driver: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = driver.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, 9)
        out, err = driver.communicate()
    return driver.returncode, out, err


def _second_driver_is_refused(command: str, out: str, first: subprocess.Popen) -> None:
    """A plain `qcrd COMMAND` on the location the first driver holds (and waits on, at its gate)."""
    started = time.monotonic()
    second = subprocess.run([QCRD, command, "--out", out, *ARGS[command]], env=_env(), capture_output=True,
                            text=True, timeout=WAIT_S)
    took = time.monotonic() - started
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 3 and len(lines) == 1, (second.returncode, second.stderr[-3000:])
    assert lines[0].startswith(f"qcrd {command}: {out} is in use by qcrd {command} on host {HERE}, pid {first.pid}, "
                               "since ")
    assert "last heartbeat" in lines[0] and "--force" in lines[0]
    assert took < REFUSED_WITHIN_S, took
    assert first.poll() is None  # the first one was not disturbed: still holding, at its gate


@pytest.mark.slow
def test_a_second_driver_on_an_s3_run_is_refused_while_the_first_finishes(s3_server, tmp_path):
    """`qcrd teach` into a folder of a run on S3: a second one is refused while the first holds it (at its gate);
    the first then finishes, and removes its lease. (`qcrd run` on S3 ends the same way: test_jobs.)"""
    out, gate = storage.join(s3_server, "lease", "run", "teacher"), tmp_path / "gate"
    first = _start("teach", out, gate)
    try:
        _wait_for(lambda: _holder(out) is not None, first, "the first driver's lease")
        _second_driver_is_refused("teach", out, first)
    finally:
        gate.touch()
        code, stdout, stderr = _finish(first)
    assert code == 0, stderr[-3000:]
    assert storage.is_file(storage.join(out, "summary.json")) and storage.list_files(out, "part-*.parquet")
    assert not storage.exists(storage.join(out, lease.LEASE_FILE))


@pytest.mark.slow
def test_force_takes_a_live_lease_a_second_driver_is_refused_and_a_taken_over_driver_stops(tmp_path):
    """On a local run: the first driver takes over, with --force, a live lease of a driver elsewhere (written
    here); a second driver started while it holds the run is refused at once with one line; then another holder
    takes the run over (--force) while the first teaches, and the first one's heartbeat stops it within a
    heartbeat, saying who took the run, and leaves the new lease in place. (A run finished and its lease removed:
    the S3 test.)"""
    out, gate = str(tmp_path / "run"), tmp_path / "gate"
    _write(out, record(host="node-elsewhere", started=time.time(), heartbeat=time.time()))
    first = _start("run", out, gate, "--force")
    try:
        _wait_for(lambda: (_holder(out) or {}).get("pid") == first.pid, first, "the --force takeover")
        _second_driver_is_refused("run", out, first)
        gate.touch()
        log = Path(out) / "logs" / "qcrd.log"
        _wait_for(lambda: log.is_file() and "stage teach" in log.read_text(), first, "the teach stage")
        taker = Lease(out, "qcrd run", on_lost=lambda: None, heartbeat_s=3600)
        taker.acquire(force=True)
    finally:
        gate.touch()
        code, _, stderr = _finish(first)
    assert "--force: taking over" in stderr and "node-elsewhere" in stderr
    assert code == 3, stderr[-3000:]
    assert (f"qcrd run: the lease of {out} was taken over by qcrd run on host {HERE}, pid {os.getpid()}"
            in stderr), stderr[-3000:]
    assert taker.read()["token"] == taker.record["token"]  # the stopped driver did not remove it
    taker.release()
