"""What a person sees while a command runs, and where everything else goes.

The console shows one progress display per stage (redrawn in place on a terminal; one plain line every
``PLAIN_INTERVAL_S`` otherwise, so a job's log or a pipe gets no carriage returns or ANSI codes), one summary line
per finished stage, and warnings and errors in full. Everything logged goes to ``RUN/logs/qcrd.log`` at DEBUG
(:func:`log_to_file`, the one place that sets up logging for a run), and Ray workers' output to
``RUN/logs/workers.log`` (``ray_utils`` routes it to :data:`WORKER_LOGGER`).

Stage code reports through :func:`progress` / :func:`summary` and works the same without a console session
(library use, tests): the display is then silent and summaries only go to the log. Rendering is pure.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

log = logging.getLogger(__name__)

PLAIN_INTERVAL_S = 15.0  # one progress line this often when stdout is not a terminal
_TTY_REDRAW_S = 0.1  # a terminal redraws at most this often
WORKER_LOGGER = "qcrd_ray.workers"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# our own loggers reach qcrd.log at DEBUG; libraries at INFO and up (Ray Data's DEBUG dumps of its DataContext and
# per-operator state, matplotlib's font search: hundreds of lines a run that say nothing to a reader)
OWN_LOGGERS = ("qcrd_ray", "serve", "jobs", "__main__")
LOG_UPLOAD_S = 30.0  # how often the logs of a run on object storage reach it while the command runs
_CLEAR = "\x1b[K"  # erase to the end of the line


# ---------------------------------------------------------------- rendering (pure)

def format_duration(seconds: float | None) -> str:
    """``75`` → ``1:15``, ``3725`` → ``1:02:05``; unknown → ``?``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def eta(done: float, total: float | None, elapsed: float) -> float | None:
    """Seconds left at the average rate so far; None until there is a rate or without a total."""
    if not total or done <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0) * elapsed / done


def render_counter(label: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    """``teach  96/192 samples  12.0 samples/s  ETA 0:08``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total}" if total else f"{done}"
    return f"{label}  {count} {unit}  {rate:.1f} {unit}/s  ETA {format_duration(eta(done, total, elapsed))}"


def counter_summary(label: str, done: int, elapsed: float, unit: str) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    return f"{label}: {done} {unit} in {format_duration(elapsed)} ({rate:.1f} {unit}/s)"


_LOSS_TERMS = ("l_pred", "l_cl", "l_d")


def render_train(label: str, metrics: dict | None, rounds: int, total_steps: int | None,
                 eta_s: float | None, elapsed: float, rounds_done: int = 0) -> str:
    """``train qcrd  round 2/20  step 34/80  loss 1.234 (l_pred 0.41 l_cl 1.50 l_d 0.69)  s_pos 0.61 s_neg 0.32
    ETA 1:05`` from rank 0's latest metrics line (``step``, ``round`` and the step's losses)."""
    if not metrics:
        # a run whose rounds are shorter than train.log_every logs no step line, only its round ends
        state = f"round {rounds_done}/{rounds} done" if rounds_done else f"starting {rounds} rounds"
        return f"{label}  {state}  {format_duration(elapsed)}"
    parts = [label, f"round {int(metrics.get('round', 0)) + 1}/{rounds}",
             f"step {metrics['step']}" + (f"/{total_steps}" if total_steps else "")]
    if "loss" in metrics:
        terms = " ".join(f"{k} {metrics[k]:.3g}" for k in _LOSS_TERMS if metrics.get(k))
        parts.append(f"loss {metrics['loss']:.4g}" + (f" ({terms})" if terms else ""))
    if metrics.get("s_pos") or metrics.get("s_neg"):
        parts.append(f"s_pos {metrics.get('s_pos', 0.0):.2f} s_neg {metrics.get('s_neg', 0.0):.2f}")
    parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


def train_summary(label: str, last_step: dict | None, rounds_done: int, elapsed: float) -> str:
    text = f"{label}: {rounds_done} rounds in {format_duration(elapsed)}"
    if last_step:
        text += f", step {last_step['step']}, loss {last_step['loss']:.4g}"
        if last_step.get("s_pos") or last_step.get("s_neg"):
            text += f", s_pos {last_step.get('s_pos', 0.0):.2f} s_neg {last_step.get('s_neg', 0.0):.2f}"
    return text


# ---------------------------------------------------------------- the console

class Console:
    """Writes the live line and summaries to ``out`` and log messages to ``err``.

    ``tty``: redraw the live line in place (``\\r`` + erase); otherwise print it as a plain line at most every
    ``interval_s`` (the first one at once). ``clock`` is injectable for tests."""

    def __init__(self, out: TextIO, err: TextIO, tty: bool, interval_s: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.err, self.tty, self.interval_s, self.clock = out, err, tty, interval_s, clock
        self._live: str | None = None  # the line on screen that the next write replaces (terminal only)
        self._last_show = float("-inf")
        self._lock = threading.Lock()  # the training follower draws from its own thread

    def _fit(self, line: str) -> str:
        width = shutil.get_terminal_size((120, 24)).columns - 1
        return line if len(line) <= width else line[: width - 1] + "…"

    def show(self, line: str, force: bool = False) -> None:
        """Update the stage's progress display."""
        with self._lock:
            now = self.clock()
            if not force and now - self._last_show < (_TTY_REDRAW_S if self.tty else self.interval_s):
                return
            self._last_show = now
            if self.tty:
                self._live = self._fit(line)
                self.out.write("\r" + self._live + _CLEAR)
            else:
                self.out.write(line + "\n")
            self.out.flush()

    def summary(self, line: str) -> None:
        """A finished stage's line: replaces the live display; the next stage's display starts afresh."""
        with self._lock:
            self.out.write(("\r" + line + _CLEAR if self.tty else line) + "\n")
            self.out.flush()
            self._live, self._last_show = None, float("-inf")

    def message(self, text: str) -> None:
        """A warning or error, in full, on its own lines; the live display is redrawn below it."""
        with self._lock:
            if self._live is not None:
                self.out.write("\r" + _CLEAR)
                self.out.flush()
            self.err.write(text.rstrip("\n") + "\n")
            self.err.flush()
            if self._live is not None:
                self.out.write(self._live)
                self.out.flush()

    def end_live(self) -> None:
        """Leave a pending live line on screen, ending it, so what follows starts on a line of its own."""
        with self._lock:
            if self._live is not None:
                self.out.write("\n")
                self.out.flush()
                self._live = None


class _ConsoleHandler(logging.Handler):
    """Log records at or above its level, through the console. Without ``tracebacks`` an exception shows as its
    message only (the traceback is in qcrd.log)."""

    def __init__(self, console: Console, level: int, tracebacks: bool):
        super().__init__(level)
        self.console, self.tracebacks = console, tracebacks
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        # summaries are already on the console; worker lines belong in workers.log
        self.addFilter(lambda r: r.name not in (__name__, WORKER_LOGGER))

    def emit(self, record: logging.LogRecord) -> None:
        if not self.tracebacks and (record.exc_info or record.stack_info):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
        try:
            self.console.message(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


_active: Console | None = None
_verbose = False


def is_verbose() -> bool:
    """Whether the running command asked for libraries' own output (``--verbose``)."""
    return _verbose


@contextmanager
def session(verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None,
            interval_s: float = PLAIN_INTERVAL_S) -> Iterator[Console]:
    """The console of one command: progress and summaries on ``out`` (stdout), warnings and errors on ``err``
    (stderr). ``verbose`` also shows INFO records and, through ``ray_utils``, Ray's and the workers' output."""
    global _active, _verbose
    out, err = out or sys.stdout, err or sys.stderr
    console = Console(out, err, tty=out.isatty(), interval_s=interval_s)
    root = logging.getLogger()
    handler = _ConsoleHandler(console, logging.INFO if verbose else logging.WARNING, tracebacks=verbose)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    if not verbose:
        _quiet_hub_progress_bars()
    _active, _verbose = console, verbose
    try:
        yield console
    finally:
        console.end_live()
        _active, _verbose = None, False
        root.removeHandler(handler)
        root.setLevel(old_level)
        for logger, h in _attached:
            logger.removeHandler(h)
            h.close()  # a handler shared by several loggers closes more than once: harmless
        _attached.clear()


def _quiet_hub_progress_bars() -> None:
    """transformers' per-load "Loading weights" / "Writing model shards" bars on this process."""
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    disable_progress_bars()
    hf_logging.disable_progress_bar()


_attached: list[tuple[logging.Logger, logging.Handler]] = []  # file handlers, detached when the session ends


def _attach(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addHandler(handler)
    _attached.append((logger, handler))


def _file_handler(path, logger: str, fmt: str) -> logging.FileHandler:
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(fmt))
    _attach(logging.getLogger(logger), handler)
    return handler


def log_to_file(log_dir) -> logging.FileHandler:
    """Everything this process logs, at DEBUG with tracebacks, to ``log_dir/qcrd.log``; Ray workers' output
    (see ``ray_utils``) to ``log_dir/workers.log``. Both are appended to (a resumed run keeps its history) and
    closed when the session ends. Returns the qcrd.log handler."""
    from pathlib import Path

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = logging.getLogger(WORKER_LOGGER)
    workers.propagate = False  # worker lines stay out of qcrd.log and off the console
    _file_handler(log_dir / "workers.log", WORKER_LOGGER, "%(message)s")
    handler = _file_handler(log_dir / "qcrd.log", "", _LOG_FORMAT)
    handler.addFilter(lambda r: r.levelno >= logging.INFO or r.name.startswith(OWN_LOGGERS))
    logging.getLogger().setLevel(logging.DEBUG)
    # a rerun appends: each command's lines start under a header saying which command, when and where
    header = f"===== {' '.join(sys.argv) or 'qcrd'} | {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} | " \
             f"host {socket.gethostname()} pid {os.getpid()} ====="
    for path in (log_dir / "qcrd.log", log_dir / "workers.log"):
        with open(path, "a") as f:
            f.write(("\n" if path.stat().st_size else "") + header + "\n")
    return handler


def log_to_storage(location) -> tuple[logging.FileHandler, Callable[[], None]]:
    """:func:`log_to_file` for a log folder that may be a URI. An object store cannot be appended to, so the logs
    are written into a node-local cache folder (seeded with the stored logs: a resumed run keeps its history),
    copied to ``location`` every ``LOG_UPLOAD_S`` while the command runs (a driver that dies leaves its log up to
    then), and ``upload()`` copies them a last time; call it when the command ends, failed or not. For a local path the
    logs are written in place and ``upload`` does nothing. Returns ``(qcrd.log handler, upload)``."""
    import hashlib

    from qcrd_ray import storage

    if not storage.is_uri(location):
        return log_to_file(location), lambda: None
    local = storage.cache_dir("logs", hashlib.sha1(str(location).encode()).hexdigest()[:16])
    names = ("qcrd.log", "workers.log")
    for name in names:
        stored = storage.join(location, name)
        (local / name).write_bytes(storage.read_bytes(stored) if storage.exists(stored) else b"")
    handler = log_to_file(local)
    lock, stop = threading.Lock(), threading.Event()

    def copy_up() -> None:
        with lock:
            for _, h in _attached:
                h.flush()
            for name in names:
                storage.write_bytes(storage.join(location, name), (local / name).read_bytes())

    def keep_uploading() -> None:  # so a driver that dies leaves its log up to the last LOG_UPLOAD_S
        while not stop.wait(LOG_UPLOAD_S):
            try:
                copy_up()
            except Exception as e:  # noqa: BLE001 - a failed copy is retried next time; the final upload reports
                logging.getLogger(__name__).debug("log upload to %s failed: %s", location, e)

    threading.Thread(target=keep_uploading, name="qcrd-log-upload", daemon=True).start()

    def upload() -> None:
        stop.set()
        copy_up()

    return handler, upload


def adopt_library_loggers(names: tuple[str, ...]) -> None:
    """Libraries that log through their own console handlers (Ray's ``ray``, ``ray.data``, ...): their console
    output shows warnings and up only (all of it with ``--verbose``), and everything reaches qcrd.log."""
    root = logging.getLogger()
    root_files = [h for logger, h in _attached if logger is root]
    for name in names:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and not _verbose:
                h.setLevel(max(h.level, logging.WARNING))
        if not logger.propagate:
            for h in root_files:
                if h not in logger.handlers:
                    _attach(logger, h)


# ---------------------------------------------------------------- stage displays

# A line a worker or actor prints (on any node) that starts with this tag is something the user must see: the
# driver routes it to the console and qcrd.log as a summary line (``ray_utils``), not only to workers.log.
NOTICE_TAG = "[qcrd notice] "


def notice(line: str) -> None:
    """From a worker, an actor or Ray Train's controller: one line for the driver's console (a worker lost and
    recovered, an actor restarted). Printed, tagged, to this process's stdout, which Ray forwards to the driver."""
    print(NOTICE_TAG + line, flush=True)


def summary(line: str) -> None:
    """One finished stage's line: on the console when a session is active, and in qcrd.log always."""
    log.info("%s", line)
    if _active is not None:
        _active.summary(line)


class Progress:
    """One stage's counter display (``update(n)`` adds ``n`` done, like tqdm). Leaving its ``with`` block prints
    the stage's summary line unless ``summarize=False`` (the caller prints a better one with :func:`summary`);
    leaving it with an exception prints a ``failed`` line. ``summarize=False`` leaves its last line on screen until
    that summary replaces it."""

    def __init__(self, label: str, total: int | None, unit: str, summarize: bool = True):
        self.label, self.total, self.unit, self.summarize = label, total, unit, summarize
        self.done = 0
        self.started = time.monotonic()

    def line(self) -> str:
        return render_counter(self.label, self.done, self.total, time.monotonic() - self.started, self.unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if _active is not None:
            _active.show(self.line())

    def track(self, items, size: Callable[[object], int] = lambda item: 1):
        """Yield ``items``, counting ``size(item)`` done once the caller is through with each."""
        with self:
            for item in items:
                yield item
                self.update(size(item))

    def __enter__(self) -> "Progress":
        if _active is not None:
            _active.show(self.line(), force=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        elapsed = time.monotonic() - self.started
        if exc_type is not None:
            summary(f"{self.label}: failed after {format_duration(elapsed)} ({self.done} {self.unit} done)")
        elif self.summarize:
            summary(counter_summary(self.label, self.done, elapsed, self.unit))


def progress(label: str, total: int | None = None, unit: str = "it", summarize: bool = True) -> Progress:
    return Progress(label, total, unit, summarize)


def read_metrics(location) -> list[dict]:
    """Rank 0's metrics lines (``RUN/<method>/train/metrics.jsonl``; a path or a URI), [] before the first."""
    from qcrd_ray import storage

    return storage.read_jsonl(location)


class TrainingFollower:
    """Follows rank 0's metrics file from a driver thread (the driver never sees the workers' output) and draws
    the training display; the round-end lines (``completed_rounds``) give the rounds done."""

    def __init__(self, label: str, metrics_location, rounds: int, steps_per_round: int | None,
                 poll_s: float = 1.0, read: Callable[[object], list[dict]] = read_metrics):
        self.label, self.location, self.rounds, self.poll_s, self.read = label, metrics_location, rounds, poll_s, read
        self.steps_per_round = steps_per_round
        self.started = time.monotonic()
        self.first_step: int | None = None  # the step the run resumed at, for the rate
        self.last_step: dict | None = None
        self.rounds_done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qcrd-train-progress", daemon=True)

    def poll(self) -> str:
        """Read the metrics once; returns the display line."""
        try:
            lines = self.read(self.location)
        except (OSError, ValueError):  # a line caught mid-write: the next poll reads it whole
            lines = []
        for m in lines:
            if "completed_rounds" in m:
                self.rounds_done = max(self.rounds_done, int(m["completed_rounds"]))
            elif "loss" in m:
                self.last_step = m
        if self.first_step is None:
            # what was logged before this follower started (a resumed run) does not count towards the rate
            self.first_step = int(self.last_step["step"]) if self.last_step else 0
        total = self.rounds * self.steps_per_round if self.steps_per_round else None
        eta_s = None
        if self.last_step and total:
            eta_s = eta(self.last_step["step"] - self.first_step, total - self.first_step,
                        time.monotonic() - self.started)
        return render_train(self.label, self.last_step, self.rounds, total, eta_s, time.monotonic() - self.started,
                            self.rounds_done)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            line = self.poll()
            if _active is not None:
                _active.show(line)

    def __enter__(self) -> "TrainingFollower":
        if _active is not None:
            _active.show(self.poll(), force=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll()
        elapsed = time.monotonic() - self.started
        if exc_type is not None:
            step = self.last_step["step"] if self.last_step else 0
            summary(f"{self.label}: failed after {format_duration(elapsed)} (step {step}, "
                    f"{self.rounds_done} rounds checkpointed)")
        else:
            summary(train_summary(self.label, self.last_step, self.rounds_done, elapsed))


def follow_training(label: str, metrics_location, rounds: int, steps_per_round: int | None) -> TrainingFollower:
    return TrainingFollower(label, metrics_location, rounds, steps_per_round)
