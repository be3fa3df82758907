"""The console: progress rendering on a terminal and in a log, logging routes, and `qcrd run`'s whole output."""

from __future__ import annotations

import io
import json
import logging
import os
import time

import pytest

from qcrd_ray import console
from qcrd_ray.testing import patience


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_durations_and_eta():
    assert console.format_duration(75) == "1:15"
    assert console.format_duration(3725) == "1:02:05"
    assert console.format_duration(None) == "?"
    assert console.eta(25, 100, 10.0) == pytest.approx(30.0)
    assert console.eta(0, 100, 10.0) is None and console.eta(5, None, 1.0) is None


def test_counter_and_training_lines_hold_what_a_person_watches():
    assert console.render_counter("teach", 96, 192, 8.0, "samples") == "teach  96/192 samples  12.0 samples/s  ETA 0:08"
    metrics = {"step": 34, "round": 1, "loss": 1.2345, "l_pred": 0.41, "l_cl": 1.5, "l_d": 0.69,
               "s_pos": 0.612, "s_neg": 0.318}
    line = console.render_train("train qcrd", metrics, 20, 80, 65.0, 30.0)
    for part in ("round 2/20", "step 34/80", "loss 1.234", "l_pred 0.41", "l_cl 1.5", "l_d 0.69",
                 "s_pos 0.61", "s_neg 0.32", "ETA 1:05"):
        assert part in line
    # finetune has no contrastive terms and no D: the line does not show zeros for them
    plain = console.render_train("train finetune", {"step": 3, "round": 0, "loss": 2.0, "l_pred": 2.0,
                                                    "l_cl": 0.0, "l_d": 0.0}, 2, None, None, 1.0)
    assert "l_cl" not in plain and "s_pos" not in plain and "step 3 " in plain


def test_plain_output_prints_one_line_per_interval_and_no_terminal_codes():
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    c = console.Console(out, err, tty=False, interval_s=10.0, clock=clock)
    c.show("a")  # the first line at once
    clock.now = 5.0
    c.show("b")  # within the interval: dropped
    clock.now = 10.5
    c.show("c")
    c.message("WARNING x: something odd")
    c.summary("stage: done")
    c.show("next stage")  # a new stage's first line is not held back by the previous stage's interval
    assert out.getvalue() == "a\nc\nstage: done\nnext stage\n"
    assert err.getvalue() == "WARNING x: something odd\n"
    assert "\r" not in out.getvalue() + err.getvalue() and "\x1b" not in out.getvalue() + err.getvalue()


def test_terminal_redraws_in_place_and_keeps_messages_above_the_live_line():
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    c = console.Console(out, err, tty=True, clock=clock)
    c.show("teach  1/4")
    clock.now = 1.0
    c.show("teach  2/4")
    c.message("WARNING: full text")
    c.summary("teach: 4 samples")
    assert out.getvalue() == ("\rteach  1/4\x1b[K" "\rteach  2/4\x1b[K"
                              "\r\x1b[K" "teach  2/4"  # cleared for the message, then redrawn
                              "\rteach: 4 samples\x1b[K\n")
    assert err.getvalue() == "WARNING: full text\n"


def test_session_shows_warnings_in_full_and_logs_everything_to_files(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    log = logging.getLogger("qcrd_ray.test_console")
    with console.session(out=out, err=err):
        console.log_to_file(tmp_path / "logs")
        log.info("an info line")
        log.warning("a warning line\nwith a second line")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("stage failed")
        logging.getLogger(console.WORKER_LOGGER).info("(RayTrainWorker pid=1) out: Reporting training result 1")
        with console.progress("eval test (predict)", total=2, unit="ex") as bar:
            bar.update(2)
    shown = err.getvalue()
    assert "a warning line\nwith a second line" in shown and "ERROR qcrd_ray.test_console: stage failed" in shown
    assert "an info line" not in shown and "Traceback" not in shown and "Reporting" not in shown + out.getvalue()
    assert out.getvalue().splitlines()[-1].startswith("eval test (predict): 2 ex in 0:00")
    qcrd_log = (tmp_path / "logs" / "qcrd.log").read_text()
    assert "an info line" in qcrd_log and "Traceback" in qcrd_log and "ValueError: boom" in qcrd_log
    assert "eval test (predict): 2 ex" in qcrd_log  # the summaries too
    assert "Reporting training result 1" in (tmp_path / "logs" / "workers.log").read_text()
    # the session's files are detached when it ends: a later run does not write into this run's logs
    log.warning("after the session")
    assert "after the session" not in (tmp_path / "logs" / "qcrd.log").read_text()


def test_a_rerun_appends_under_its_own_header_and_library_debug_stays_out(tmp_path):
    """qcrd.log keeps every command's lines, each command's under a header (command, time, host, pid); libraries
    reach it at INFO and up (Ray Data's DEBUG dumps do not), our own modules at DEBUG."""
    import ray.data  # noqa: F401 - its import gives it its own handlers, no propagation: as in every qcrd command

    for attempt in ("first", "second"):
        with console.session(out=io.StringIO(), err=io.StringIO()):
            console.log_to_file(tmp_path / "logs")
            console.adopt_library_loggers(("ray.data",))  # as ray_utils does: Ray Data's loggers may not propagate
            logging.getLogger("qcrd_ray.test_console").debug("%s run: our own debug line", attempt)
            logging.getLogger("ray.data._internal.execution.streaming_executor").debug("DataContext(target_max=...)")
            logging.getLogger("ray.data").info("%s run: Ray Data's info line", attempt)
    text = (tmp_path / "logs" / "qcrd.log").read_text()
    headers = [line for line in text.splitlines() if line.startswith("===== ")]
    assert len(headers) == 2 and all(f"pid {os.getpid()}" in h and " UTC | host " in h for h in headers)
    sections = text.split("===== ")[1:]  # one per command, in order
    assert "first run: our own debug line" in sections[0] and "second run: our own debug line" in sections[1]
    assert "second run: Ray Data's info line" in text and "DataContext" not in text
    assert (tmp_path / "logs" / "workers.log").read_text().count("===== ") == 2


def test_logs_of_a_run_on_storage_reach_it_while_the_command_runs(s3_server, monkeypatch):
    """On an object store the log is a local file copied up every LOG_UPLOAD_S: a driver that dies mid-run leaves
    its log at the run's URI up to then; the final upload copies the rest."""
    from qcrd_ray import storage

    monkeypatch.setattr(console, "LOG_UPLOAD_S", 0.2)
    location = storage.join(s3_server, "console-logs", "logs")
    with console.session(out=io.StringIO(), err=io.StringIO()):
        _, upload = console.log_to_storage(location)
        logging.getLogger("qcrd_ray.test_console").info("written mid-run")
        deadline = time.monotonic() + patience(30)
        while not (storage.exists(storage.join(location, "qcrd.log"))
                   and "written mid-run" in storage.read_text(storage.join(location, "qcrd.log"))):
            assert time.monotonic() < deadline, "the log never reached the run's URI while the command ran"
            time.sleep(0.1)
        logging.getLogger("qcrd_ray.test_console").info("written at the end")
        upload()
    assert "written at the end" in storage.read_text(storage.join(location, "qcrd.log"))


def test_verbose_session_shows_info_and_tracebacks():
    out, err = io.StringIO(), io.StringIO()
    with console.session(verbose=True, out=out, err=err):
        assert console.is_verbose()
        logging.getLogger("qcrd_ray.test_console").info("an info line")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("qcrd_ray.test_console").exception("failed")
    assert "an info line" in err.getvalue() and "ValueError: boom" in err.getvalue()
    assert not console.is_verbose()


def test_training_follower_reads_rank0_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "round": 0, "loss": 3.0, "l_pred": 1.0, "l_cl": 4.0, "l_d": 0.7, "s_pos": 0.5, "s_neg": 0.4},
             {"step": 4, "completed_rounds": 1, "round_s": 2.0},
             {"step": 5, "round": 1, "loss": 2.5, "l_pred": 0.9, "l_cl": 3.2, "l_d": 0.6, "s_pos": 0.7, "s_neg": 0.2}]
    follower = console.follow_training("train qcrd", str(path), rounds=2, steps_per_round=4)
    assert "starting 2 rounds" in follower.poll()  # no file yet
    path.write_text("".join(json.dumps(m) + "\n" for m in lines))
    line = follower.poll()
    assert "round 2/2" in line and "step 5/8" in line and "loss 2.5" in line and "s_pos 0.70 s_neg 0.20" in line
    out, err = io.StringIO(), io.StringIO()
    with console.session(out=out, err=err):
        with console.follow_training("train qcrd", str(path), rounds=2, steps_per_round=4):
            pass
    assert out.getvalue().splitlines()[-1].startswith("train qcrd: 1 rounds in 0:00, step 5, loss 2.5, s_pos 0.70")


def test_training_follower_shows_round_ends_when_rounds_are_shorter_than_log_every(tmp_path):
    """Rounds of fewer steps than train.log_every log only their ends: the display must move, not stay at 'starting'."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 4, "completed_rounds": 1, "round_s": 2.0}) + "\n")
    line = console.follow_training("train dss", str(path), rounds=3, steps_per_round=4).poll()
    assert "round 1/3 done" in line and "starting" not in line


@pytest.mark.slow
def test_qcrd_run_prints_a_short_readable_console_and_keeps_the_logs(shared_run):
    """The command as a user (or a cluster job) runs it: its own process and Ray, stdout a pipe (conftest's
    shared_run: `qcrd run --methods dss,qcrd`)."""
    printed = shared_run.printed
    lines = printed.splitlines()
    assert len(lines) < 40, printed
    assert "TrainingReport(" not in printed and "Loading weights" not in printed and "\r" not in printed
    summaries = [line for line in lines if ": " in line and line.split(":")[0] in
                 ("teach", "train dss", "train qcrd", "eval test (predict)", "eval test (explain)")]
    assert [s.split(":")[0] for s in summaries] == ["teach",
                                                    "train dss", "eval test (predict)", "eval test (explain)",
                                                    "train qcrd", "eval test (predict)", "eval test (explain)"], printed
    for train, predict in ((summaries[1], summaries[2]), (summaries[4], summaries[5])):
        assert "rounds in" in train and "accuracy" in predict
    assert "s_pos" in summaries[4] and "s_pos" not in summaries[1]  # D's scores: qcrd's, dss has no D
    logs = shared_run.out / "logs"
    assert "teach: 192 samples" in (logs / "qcrd.log").read_text()
    assert "TrainingReport(" in (logs / "workers.log").read_text()  # Ray Train's own output is kept, off-screen
