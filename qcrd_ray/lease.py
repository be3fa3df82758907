"""One driver per run: a lease file at the run's location (``RUN/_LEASE.json``).

Why: a second driver started on a run that another is still driving (a job resubmitted while its first copy
runs) would attach to the first one's named actors, delete snapshots and temporary files the first still needs
and interleave its uploads with the first one's. Every command that writes a run (``qcrd run``, ``teach``,
``train``, ``eval`` and their ``jobs.*`` entrypoints) therefore holds the lease of the location it writes,
from before it touches anything there until it exits (normally, on an error or on Ctrl-C).

The lease names its holder (host, pid, a random token, start time) and carries a heartbeat that a background
thread refreshes every ``HEARTBEAT_S``. A lease whose heartbeat is older than ``STALE_AFTER_S``, or whose
holder is a process on this host that no longer exists (a driver killed with SIGKILL), is stale and is taken
over with a message saying so; a live one refuses the second driver with one line naming the holder, unless
``--force`` takes it over.

There is no compare-and-swap in pyarrow's object-store filesystems, so taking the lease is write, wait
``CONFIRM_S``, re-read: of two drivers that both found it free, the one that wrote last keeps it and the other
is refused. A driver whose check-then-write spans more than ``CONFIRM_S`` (a stalled process, a very slow
store) can still overwrite a lease that was just confirmed; then both believe they hold it until the next
heartbeat, when the heartbeat thread of the one that lost sees another token and stops its driver with
:class:`LeaseLost` instead of letting it write on. A driver that cannot refresh its lease for ``STALE_AFTER_S``
stops the same way, since another may have taken it over as stale. Heartbeats compare wall clocks of different
hosts: ``STALE_AFTER_S`` must exceed their skew.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Callable, Iterator

from qcrd_ray import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
HEARTBEAT_S = 10.0  # the holder refreshes its heartbeat this often
STALE_HEARTBEATS = 4  # a lease this many heartbeats old: its holder is gone (or cut off from storage)
STALE_AFTER_S = STALE_HEARTBEATS * HEARTBEAT_S
CONFIRM_S = 1.0  # wait between writing the lease and re-reading it (a concurrent writer lands meanwhile)


class LeaseError(RuntimeError):
    """The run's lease could not be held; the message is one line for the console."""


class LeaseHeld(LeaseError):
    """Another live driver holds the run."""


class LeaseLost(LeaseError):
    """This driver lost the lease while it ran (taken over, or not refreshable): it stopped writing."""


# ------------------------------------------------------------------------------------------ pure logic


def new_record(command: str, now: float, host: str | None = None, pid: int | None = None) -> dict:
    """A fresh lease for this process."""
    return {"host": host or socket.gethostname(), "pid": os.getpid() if pid is None else pid,
            "token": uuid.uuid4().hex, "command": command, "started": now, "heartbeat": now}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def state(record: dict | None, now: float, stale_after_s: float = STALE_AFTER_S, host: str | None = None,
          alive: Callable[[int], bool] = pid_alive) -> str:
    """``free`` (no lease), ``live`` (held by a driver that heartbeats), ``stale`` (no heartbeat for
    ``stale_after_s``, or unreadable) or ``dead`` (its holder was a process of this host that is gone)."""
    if record is None:
        return "free"
    try:
        age = now - float(record["heartbeat"])
        same_host = record["host"] == (host or socket.gethostname())
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return "stale"
    if same_host and not alive(pid):
        return "dead"
    return "stale" if age > stale_after_s else "live"


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(record: dict, now: float) -> str:
    """``qcrd run on host h, pid 12, since 2025-01-01 10:00:00 UTC, last heartbeat 3 s ago``."""
    try:
        return (f"{record.get('command', 'a driver')} on host {record['host']}, pid {record['pid']}, since "
                f"{_utc(float(record['started']))}, last heartbeat {now - float(record['heartbeat']):.0f} s ago")
    except (KeyError, TypeError, ValueError):
        return f"an unreadable lease ({json.dumps(record)[:120]})"


def refusal(location: str, record: dict, now: float, stale_after_s: float) -> str:
    return (f"{location} is in use by {describe(record, now)}; wait until it ends (or until its lease is "
            f"stale, {stale_after_s:.0f} s without a heartbeat), or take it over with --force")


# ------------------------------------------------------------------------------------------ the lease


def stop_main_thread() -> None:
    """Interrupt the main thread as Ctrl-C does, a blocking wait included (``_thread.interrupt_main`` would wait
    for it to return); ``held`` turns that into LeaseLost. A process that ignores SIGINT and holds its lease off
    the main thread is sent SIGTERM instead (``held`` in the main thread makes SIGINT work, see below)."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _interruptible_once_lost(lease: Lease) -> Iterator[None]:
    """A process started in the background by a shell ignores SIGINT (so the terminal's Ctrl-C cannot reach it),
    and SIGTERM to a Ray driver aborts it at exit. While such a process holds a lease in its main thread, SIGINT
    interrupts it only once the lease is lost: a Ctrl-C on the terminal still does nothing."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return

    def interrupt_if_lost(signum, frame):
        if lease.lost:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt_if_lost)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class Lease:
    """The lease of one run location, for this process. :meth:`acquire` takes it (or raises
    :class:`LeaseHeld`) and starts the heartbeat; :meth:`release` stops it and removes the file if it is
    still ours. Timings are constructor arguments so tests can shorten them; ``on_lost`` (default: interrupt
    the main thread, where the CLI holds the lease) is called from the heartbeat thread when it is lost."""

    def __init__(self, location: storage.Location, command: str = "qcrd", heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float | None = None, confirm_s: float = CONFIRM_S,
                 on_lost: Callable[[], None] | None = None):
        self.location, self.command = str(location), command
        self.path = storage.join(self.location, LEASE_FILE)
        self.heartbeat_s, self.confirm_s = heartbeat_s, confirm_s
        self.stale_after_s = STALE_HEARTBEATS * heartbeat_s if stale_after_s is None else stale_after_s
        self.on_lost = on_lost or stop_main_thread
        self.record: dict | None = None
        self.lost: str | None = None  # why the lease was lost, once it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # half a file cannot happen (writes are atomic); a hand-edited one can
            return {}

    def acquire(self, force: bool = False) -> None:
        now = time.time()
        current = self.read()
        verdict = state(current, now, self.stale_after_s)
        if verdict == "live" and not force:
            raise LeaseHeld(refusal(self.location, current, now, self.stale_after_s))
        if verdict == "live":
            log.warning("--force: taking over %s from %s; that driver stops at its next heartbeat",
                        self.location, describe(current, now))
        elif verdict == "dead":
            log.warning("taking over the lease of %s: its holder (%s) is no longer running",
                        self.location, describe(current, now))
        elif verdict == "stale":
            log.warning("taking over the stale lease of %s (%s)", self.location, describe(current, now))
        self.record = new_record(self.command, now)
        storage.write_json(self.path, self.record)
        time.sleep(self.confirm_s)  # a driver that took it at the same moment has written by now
        again = self.read()
        if not again or again.get("token") != self.record["token"]:
            self.record = None
            who = describe(again, time.time()) if again else "a driver that has already released it"
            raise LeaseHeld(f"{self.location} was taken at the same moment by {who}; run the command again")
        self._thread = threading.Thread(target=self._beat, name="qcrd-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(self.heartbeat_s):
            now = time.time()
            try:
                current = self.read()
                if current is None or current.get("token") != self.record["token"]:
                    taker = "someone who removed it" if current is None else describe(current, now)
                    return self._lose(f"the lease of {self.location} was taken over by {taker}")
                if self._stop.is_set():  # released meanwhile: a heartbeat now would bring the lease back
                    return
                storage.write_json(self.path, {**self.record, "heartbeat": now})
                last_ok = now
            except Exception as e:  # noqa: BLE001 - a transient storage error: try again next beat
                log.warning("could not refresh the lease of %s: %s", self.location, e)
                if now - last_ok > self.stale_after_s:
                    return self._lose(f"the lease of {self.location} could not be refreshed for "
                                      f"{now - last_ok:.0f} s (another driver may have taken it over)")

    def _lose(self, why: str) -> None:
        self.lost = why
        if self._stop.is_set():  # the driver is already releasing: nothing left to stop
            return
        log.error("%s; stopping this driver so that only one writes the run", why)
        self.on_lost()

    def release(self) -> None:
        """Stop the heartbeat; remove the lease if it is still ours (a lost one belongs to its new holder)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s + 5)
        if self.record is None or self.lost:
            return
        try:
            current = self.read()
            if current and current.get("token") == self.record["token"]:
                storage.delete(self.path)
        except Exception as e:  # noqa: BLE001 - the run's own outcome matters more; the lease goes stale
            log.warning("could not release the lease of %s (it goes stale in %.0f s): %s",
                        self.location, self.stale_after_s, e)
        self.record = None


@contextlib.contextmanager
def held(location: storage.Location, command: str, force: bool = False, **timings) -> Iterator[Lease]:
    """Hold the lease of ``location`` for the block. Raises :class:`LeaseHeld` before the block when another
    live driver holds it, and :class:`LeaseLost` when the lease is lost during the block (the heartbeat thread
    interrupts the main thread; whatever the block was doing is cut short)."""
    lease = Lease(location, command, **timings)
    with _interruptible_once_lost(lease):
        lease.acquire(force=force)
        try:
            yield lease
        except BaseException as e:
            _release(lease)
            if lease.lost:
                raise LeaseLost(f"{lease.lost}; this driver stopped") from e
            raise
        _release(lease)
    if lease.lost:  # the block ended anyway (it swallowed the interrupt, or had just finished)
        raise LeaseLost(f"{lease.lost}; this driver stopped")


def _release(lease: Lease) -> None:
    try:
        lease.release()
    except KeyboardInterrupt:  # the lost lease's interrupt, landing late
        if not lease.lost:
            raise
