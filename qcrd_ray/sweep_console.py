"""What a running sweep shows: a console line per trial started, finished or failed (a sweep runs for hours), and
Tune's own prints moved off the console into qcrd.log.

``TrialLines`` is a module-level class so that ``Tuner.restore`` (which unpickles the run config with its
callbacks) finds it by reference: a continued sweep shows its lines with the current code."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator

from ray import tune

from qcrd_ray import console
from qcrd_ray.sweep import SPLITS, percent, trial_name


def trial_line(row: dict, metric: str, done: int, total: int) -> str:
    """A finished trial's line: its valid and test accuracy on ``metric``, its time, and the sweep's count."""
    scores = ", ".join(f"{split} {metric} {percent(row.get(f'{split}_{metric}'))} %" for split in SPLITS)
    return (f"trial {row['trial']}: {scores} in {console.format_duration(row.get('wall_s'))} "
            f"({done}/{total} trials done)")


class TrialLines(tune.Callback):
    """Tune callback: each trial's start, result or failure on the console (and in qcrd.log)."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric = total, metric

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        running = sum(t.status == "RUNNING" for t in trials if t is not trial) + 1
        console.summary(f"trial {trial_name(trial.config['point'])}: started ({running} running)")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        row = trial.last_result or {}
        if "trial" in row:  # counted apart from this trial: Tune may mark it terminated before or after the call
            done = 1 + sum(t.status == "TERMINATED" for t in trials if t is not trial)
            console.summary(trial_line(row, self.metric, done, self.total))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        console.summary(f"trial {trial_name(trial.config['point'])}: failed (traceback in {trial.error_file}); "
                        f"the other trials go on, and rerunning the command retries it")


class _LogLines(io.TextIOBase):
    """A text stream whose complete lines become INFO records of ``logger``."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info("%s", line)
        return len(text)


@contextlib.contextmanager
def tune_prints_to_log() -> Iterator[None]:
    """Tune prints its experiment box and result paths even at ``verbose=0``; this sends what is printed to
    stdout meanwhile to qcrd.log instead (with ``--verbose``: left on the console). The console itself writes
    to the stream it was given, so the sweep's own lines still show."""
    if console.is_verbose():
        yield
        return
    stream = _LogLines(logging.getLogger("ray.tune"))
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.write("\n")  # a last line printed without one
