"""The sweep's Ray Tune shell (docs/design.md, "Sweeps"): one trial (teach once per teacher key, train its method,
evaluate on valid and test), the function trainable, ``Tuner`` / ``Tuner.restore``, and what a running sweep
shows: a console line per trial started, finished or failed, with Tune's own prints moved into qcrd.log.

Each trial calls ``pipeline.run_pipeline`` for its one method in ``SWEEP/trials/<trial>``; its ``TorchTrainer`` is
the Ray Train V2 driver inside the trial, so Train gives the trial's workers their own placement group (the trial
itself asks for ``trial_cpus``, and ``max_concurrent_trials`` bounds how many run at once). An interrupted sweep
continues with the same command: ``Tuner.restore`` keeps finished trials, and a restarted trial's stages resume
from its run directory.

``TrialLines`` is a module-level class so that ``Tuner.restore`` (which unpickles the run config with its
callbacks) finds it by reference: a continued sweep shows its lines with the current code. Sweeps started before
this module existed pickled it as ``qcrd_ray.sweep_console.TrialLines``, which stays an alias of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import yaml
from ray import tune

from qcrd_ray import console, storage
from qcrd_ray.config import Config, ConfigError
from qcrd_ray.sweep import ledger
from qcrd_ray.sweep.output import percent, write_outputs
from qcrd_ray.sweep.spec import (METRICS, SPLITS, SWEEP_FILE, SweepSpec, check_recorded, grid_points, rationale_scores,
                                 row_keys, search_grid, spec_record, teacher_key, trial_config, trial_count,
                                 trial_name)


def _teach_once(cfg: Config, shared: str) -> None:
    """Teach into ``shared`` unless another trial did; concurrent trials of one key wait on its lock."""
    from qcrd_ray.teacher.pipeline import run_teacher

    os.makedirs(shared, exist_ok=True)
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if storage.read_json(storage.join(shared, "summary.json")) is None:
            run_teacher(cfg, shared)


def _evaluate_test(cfg: Config, result: dict) -> dict:
    from qcrd_ray.evaluate import evaluate_once
    from qcrd_ray.methods import method_spec
    from qcrd_ray.runs import MethodLayout

    where = MethodLayout.at(result["dir"])
    return {mode: evaluate_once(where.model, cfg, "test", mode, where.eval("test", mode))
            for mode in method_spec(cfg.train.method).eval_modes}


def run_trial(point: dict, spec: SweepSpec, sweep_dir: str, recorded: dict | None = None) -> dict:
    """One trial: teach (shared), train this trial's method, evaluate on valid and test; returns its row. A trial
    whose config is in ``recorded`` (the sweep's ledger, by config hash) returns the recorded row instead."""
    from qcrd_ray import provenance, trackers
    from qcrd_ray.pipeline import run_pipeline
    from qcrd_ray.runs import MethodLayout

    start = time.time()
    cfg = trial_config(spec, point)
    entry = (recorded or {}).get(ledger.config_hash(cfg))
    if entry is not None:
        return ledger.row_from(entry, trial_name(point), point)
    run_dir = os.path.join(sweep_dir, "trials", trial_name(point))
    shared = os.path.join(sweep_dir, "teachers", teacher_key(cfg))
    _teach_once(cfg, shared)
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.lexists(os.path.join(run_dir, "teacher")):
        os.symlink(shared, os.path.join(run_dir, "teacher"))
    result = run_pipeline(cfg.replace(data={"eval_split": "valid"}), run_dir, methods=(cfg.train.method,))
    method = result["methods"][cfg.train.method]
    evals = {"valid": method["eval"], "test": _evaluate_test(cfg, method)}
    row = {"trial": trial_name(point), **point, "teacher_accuracy": result["teacher"].get("teacher_accuracy"),
           "wall_s": round(time.time() - start, 1),
           "machine": provenance.machines(storage.read_jsonl(MethodLayout(method["dir"]).environment))}
    for split in SPLITS:
        for mode in METRICS:
            m = evals[split].get(mode)
            row[f"{split}_{mode}"] = m["accuracy"] if m else None
        row.update(rationale_scores(split, (evals[split].get("explain") or {}).get("rationale_checks", {})))
    # valid went to the trackers with run_pipeline's evaluation; test joins it here
    trackers.log_results(cfg, method["dir"], {k: v for k, v in row.items() if k.startswith("test_")})
    return row


def _trainable(config: dict, spec_dict: dict, sweep_dir: str, recorded: dict | None = None) -> None:
    # its name is part of the Tune experiment: Tuner.restore refuses a trainable of another name
    tune.report(run_trial(config["point"], SweepSpec(**spec_dict), sweep_dir, recorded))


def _param_space(spec: SweepSpec) -> dict:
    point = {k: tune.grid_search(v) for k, v in search_grid(spec).items()}
    for key, dist in spec.random.items():
        kind, args = next(iter(dist.items()))
        point[key] = getattr(tune, kind)(args) if kind == "choice" else getattr(tune, kind)(*args[:2])
    return {"point": point}


def record_sweep(spec: SweepSpec, out: str) -> None:
    """Write ``out/sweep.yaml``, refusing a directory that holds another sweep: one that records any field but
    ``decision`` otherwise (a sweep started before its file named a rule continues). The scheduling
    and table fields count too: ``Tuner.restore`` keeps the run's stored settings, and results.csv's rows are
    the trials of one spec."""
    check_recorded(spec, out, tuple(f for f in SweepSpec.__dataclass_fields__ if f != "decision"),
                   "give the same --set options to continue it, or choose a new --out")
    Path(out, SWEEP_FILE).write_text(yaml.safe_dump(spec_record(spec), sort_keys=False))


def _from_ledger(spec: SweepSpec, location: str) -> dict:
    """The ledger's records, and a console line saying how many of the sweep's trials it already holds."""
    recorded = ledger.read(location)
    if spec.random:  # a drawn trial's config is known only once Tune draws it
        known = f"{len(recorded)} trials recorded there; those this sweep draws again are"
    else:
        known = sum(ledger.config_hash(trial_config(spec, point)) in recorded for point in grid_points(spec))
        known = f"{known} of {trial_count(spec)} trials recorded there are"
    console.summary(f"ledger {location}: {known} taken from it, not trained; every finished trial is added to it")
    return recorded


def run_sweep(spec: SweepSpec, out: str, address: str | None = None, ledger_at: str | None = None) -> list[dict]:
    """Run (or continue) the sweep in ``out``; writes the tables, best.yaml and the plots; returns the rows. With
    ``ledger_at``, trials recorded in that ledger are taken from it and finished ones are added to it."""
    from qcrd_ray.ray_utils import init_ray

    if storage.is_uri(out):
        raise ConfigError(f"--out {out}: a sweep directory must be a path (a shared mount on a cluster): trials "
                          f"share teacher outputs through file locks")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    record_sweep(spec, out)
    recorded = _from_ledger(spec, ledger_at) if ledger_at else {}
    init_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, spec_dict=asdict(spec), sweep_dir=out, recorded=recorded),
        {"CPU": spec.trial_cpus})
    path = os.path.join(out, "tune")
    if tune.Tuner.can_restore(path):
        console.summary(f"continuing the sweep in {path}: finished trials are kept, unfinished ones resume")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=_param_space(spec),
            tune_config=tune.TuneConfig(num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent_trials),
            run_config=tune.RunConfig(name="tune", storage_path=out, verbose=0,
                                      callbacks=[TrialLines(trial_count(spec), spec.metric)]),
        )
    with tune_prints_to_log():
        results = tuner.fit()
    rows, errors, unfinished = [], [], []
    columns = row_keys(spec)
    for result in results:
        if result.error is not None:
            errors.append(f"{result.config.get('point')}: {result.error}")
        elif "trial" not in (result.metrics or {}):  # stopped (Ctrl-C) before it reported
            unfinished.append(result.config.get("point"))
        else:
            rows.append({k: v for k, v in result.metrics.items() if k in columns})
    if ledger_at:  # before the tables: a sweep stopped by Ctrl-C records what it finished
        ledger.add_rows(ledger_at, spec, rows)
    write_outputs(spec, out, rows)
    if errors or unfinished:
        first = errors[0] if errors else f"{unfinished[0]}: not finished"
        raise RuntimeError(f"{len(errors)} trial(s) failed and {len(unfinished)} did not finish (rerun the same "
                           f"command to continue): {first}")
    return rows


# ---- what a running sweep shows


def trial_line(row: dict, metric: str, done: int, total: int) -> str:
    """A finished trial's line: its valid and test accuracy on ``metric``, its time, and the sweep's count."""
    scores = ", ".join(f"{split} {metric} {percent(row.get(f'{split}_{metric}'))} %" for split in SPLITS)
    how = (f"from the ledger ({row['taken_from']})" if row.get("taken_from")
           else f"in {console.format_duration(row.get('wall_s'))}")
    return f"trial {row['trial']}: {scores} {how} ({done}/{total} trials done)"


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
