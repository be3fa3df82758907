"""``qcrd sweep --rescore-valid N``: a sweep's finished trials scored again (predict) on N fresh valid problems of
the synthetic task, and their explain-mode rationales checked again, without Ray (docs/design.md, "Sweeps")."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import yaml

from qcrd_ray.config import ConfigError
from qcrd_ray.sweep import ledger
from qcrd_ray.sweep.output import (machines_note, plot_accuracy, plot_differences, rationale_tables, summary_legend,
                                   summary_table, verdict_section, write_csv)
from qcrd_ray.sweep.spec import SPLITS, TRIAL_FIELDS, SweepSpec, axes, check_recorded, rationale_scores, trial_config


def rescore_valid(spec: SweepSpec, out: str, eval_size: int, ledger_at: str | None = None) -> list[dict]:
    """Every finished trial of the sweep in ``out`` (the rows of its results.csv) scored again in predict mode on
    ``eval_size`` fresh valid problems of the synthetic task; writes ``rescored-valid-<N>.csv`` and ``.md`` (the
    summary's tables for the new column beside the sweep's own valid predict, then the sweep file's decision
    rule's verdicts), ``rescored-valid-<N>.png`` (each method's paired difference to the baseline) and
    ``rescored-valid-<N>-accuracy.png`` (each method's accuracy against the plotted key), and returns the rows.

    Why: a testbed's 150-problem eval splits carry ±4 points of binomial noise per accuracy, as much as the effects
    in question; this separates that noise from the seed-to-seed spread of training. The problems are the valid
    split of the same task with ``data.synthetic_eval_size = eval_size``: the task's problem stream is test, valid,
    train, so they are disjoint from the trial's training and test problems when eval_size ≥ 2 × its eval size +
    its train size (checked). Scores are kept in each trial (``<method>/eval/valid<N>-predict``): a rerun scores
    only trials it has not scored. With ``ledger_at`` (the sweep's ``--ledger``), a trial taken from the ledger,
    whose model is not here, gives the score recorded there, and every score is added to the ledger.

    Each trial here also has its explain outputs' rationale checks computed again (``evaluate.recheck_rationales``),
    so trials evaluated before their task had checks gain them: rescored-valid-<N>.md tabulates them and the
    ledger records them."""
    from qcrd_ray.evaluate import evaluate_once, recheck_rationales
    from qcrd_ray.runs import MethodLayout, RunLayout, load_run_config

    results = os.path.join(out, "results.csv")
    if not os.path.exists(results):
        raise ConfigError(f"{out}: no results.csv (run the sweep first; every run of it writes one)")
    # a trial not here is looked up in the ledger by its config from this spec, and scores go in under it
    check_recorded(spec, out, TRIAL_FIELDS, "give the --set options the sweep ran with")
    column = f"valid{eval_size}_predict"
    rows = []
    with open(results, newline="") as f:
        finished = [{k: yaml.safe_load(v) if v != "" else None for k, v in r.items()} for r in csv.DictReader(f)]
    recorded = ledger.read(ledger_at)
    for row in finished:
        run_dir = os.path.join(out, "trials", str(row["trial"]))
        if not os.path.exists(RunLayout(run_dir).config):
            cfg = trial_config(spec, {k: row[k] for k in axes(spec)})
            entry = recorded.get(ledger.config_hash(cfg), {}).get("scores", {})
            if column not in entry:
                raise ConfigError(f"{row['trial']}: its model is not in {out} and no ledger records its {column} "
                                  f"(pass the --ledger it was taken from; a ledger holds scores, not models)")
            rows.append({**row, column: entry[column]})
            continue
        cfg = load_run_config(RunLayout(run_dir).config)
        d = cfg.data
        if d.data_dir is not None or d.task != "synthetic":
            raise ConfigError(f"{row['trial']}: --rescore-valid needs the synthetic task (its eval splits have a "
                              f"size to choose); this trial reads {d.data_dir or d.task}")
        least = 2 * d.synthetic_eval_size + d.synthetic_train_size
        if eval_size < least:
            raise ConfigError(f"--rescore-valid {eval_size}: the problems would overlap the trials' training "
                              f"problems; use at least {least} (2 × eval size + train size)")
        where = MethodLayout.at(os.path.join(run_dir, cfg.train.method))
        metrics = evaluate_once(where.model, cfg.replace(data={"synthetic_eval_size": eval_size}), "valid",
                                "predict", where.eval(f"valid{eval_size}", "predict"))
        row = {**row, column: metrics["accuracy"]}
        for split in SPLITS:  # the checks again from the saved explain outputs (trials run before them gain them)
            row.update(rationale_scores(split, recheck_rationales(cfg, where.eval(split, "explain"))))
        rows.append(row)
    if ledger_at:
        ledger.add_rows(ledger_at, spec, rows)
    write_csv(os.path.join(out, f"rescored-valid-{eval_size}.csv"), ["trial", *axes(spec), "valid_predict", column],
              rows)
    lines = [f"# Sweep {spec.name}: valid predict on {eval_size} problems, {len(rows)} trials\n",
             summary_legend(spec), *machines_note(rows)]
    lines += summary_table(spec, rows, "valid_predict", "valid predict (the sweep's own valid split)")
    lines += summary_table(spec, rows, column, f"valid predict, {eval_size} fresh problems")
    lines += verdict_section(spec, rows, column, f"valid predict, {eval_size} fresh problems")
    lines += rationale_tables(spec, rows)
    Path(out, f"rescored-valid-{eval_size}.md").write_text("\n".join(lines) + "\n")
    plot_differences(spec, rows, column, f"valid predict, {eval_size} fresh problems",
                     os.path.join(out, f"rescored-valid-{eval_size}.png"))
    plot_accuracy(spec, rows, os.path.join(out, f"rescored-valid-{eval_size}-accuracy.png"), (column,),
                  f"valid predict on {eval_size} fresh problems (%)")
    return rows
