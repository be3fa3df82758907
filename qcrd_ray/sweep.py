"""`qcrd sweep`: a grid (and random search) of full teach → train → eval trials, run as one ``ray.tune.Tuner``.

A sweep file (sweeps/*.yaml) holds a base config, a ``grid`` of ``section.key: [values]`` (every combination is a
trial) and optionally ``random`` keys drawn ``num_samples`` times per grid point (``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{choice: [...]}``). Each trial is a Tune function trainable that calls
``pipeline.run_pipeline`` for its one method in ``SWEEP/trials/<trial>``; its ``TorchTrainer`` is the Ray Train V2
driver inside the trial, so Train gives the trial's workers their own placement group (the trial itself asks for
``trial_cpus``, 0.01 CPU by default, and ``max_concurrent_trials`` bounds how many run at once).

Trials whose data / teacher / self_consistency settings agree share one teacher output
(``SWEEP/teachers/<key>``, taught once under a file lock, linked as the trial's ``teacher``), so a method × seed
grid teaches once per noise level. Trials are evaluated on ``valid`` (the only split used to choose) and on
``test`` (read for the final table). An interrupted sweep continues with the same command: ``Tuner.restore``
keeps finished trials, and a restarted trial's stages resume from its run directory.

Outputs in SWEEP/: results.csv / results.md (one row per trial), summary.md (per cell: mean ± sd and the paired
difference to the baseline method by seed with a 95 % t interval), best.yaml (the best cell on valid) and
accuracy.png (accuracy against the plotted key, one line per method) and differences.png (each method's paired
difference to the baseline with its 95 % interval against the plotted key: with a clean-DSS arm, the headroom
H = clean-DSS − DSS next to QCRD − DSS). Summaries also pool the plotted key's levels (pairs = level × seed).
``--rescore-valid N`` (:func:`rescore_valid`) scores the finished trials again on N fresh valid problems of the
synthetic task. Pure functions: :func:`load_sweep`, :func:`grid_points`, :func:`trial_name`, :func:`teacher_key`,
:func:`mean_sd`, :func:`paired_difference`, :func:`cell_table`, :func:`pooled_rows`, :func:`difference_series`,
:func:`pairs_for_half_width`.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from qcrd_ray.config import Config, ConfigError, from_dict

log = logging.getLogger(__name__)

SPLITS = ("valid", "test")  # valid chooses, test reports
RANDOM_KINDS = ("uniform", "loguniform", "choice")
METRICS = ("predict", "explain")
# the smallest difference a summary says how many seeds it would take to resolve: the paper's gains over DSS are
# 0.2-3.5 points, and the quality study's target is +2
RESOLVE = 0.02


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict = field(default_factory=dict)  # config sections, as in a qcrd config file
    grid: dict = field(default_factory=dict)  # "section.key" -> list of values
    random: dict = field(default_factory=dict)  # "section.key" -> {uniform|loguniform|choice: ...}
    # named sets of "section.key: value" (an ablation's rows): one more grid axis, "variant"
    variants: dict = field(default_factory=dict)
    num_samples: int = 1  # random draws per grid point
    metric: str = "predict"  # the valid accuracy that picks the best cell
    compare_on: str = "train.method"  # the grid key whose baseline value the paired differences are taken to
    baseline: str = "dss"
    pair_by: str = "train.seed"  # the key whose values pair trials of two methods
    plot_x: str = "teacher.noise"  # x axis of accuracy.png (a grid key)
    max_concurrent_trials: int = 1
    # the trial driver's own CPU (Tune refuses an empty request); Train's workers ask for theirs (train.*)
    trial_cpus: float = 0.01


def _set(raw: dict, dotted: str, value) -> dict:
    section, key = dotted.split(".")
    out = {s: dict(v) for s, v in raw.items()}
    out.setdefault(section, {})[key] = value
    return out


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``qcrd sweep --set``: ``grid.teacher.noise=[0.3]`` (a grid, random or variants entry: the field, then the
    config key), ``base.train.rounds=4`` (a base config value), ``max_concurrent_trials=2`` (a sweep field).
    Values are YAML, as in ``--set`` of the other commands."""
    out = dict(raw)
    for text in overrides:
        path, sep, value = text.partition("=")
        field_name, _, key = path.strip().partition(".")
        if not sep or not field_name:
            raise ConfigError(f"--set {text!r}: expected field[.section.key]=value (e.g. grid.teacher.noise=[0.3])")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        if not key:
            out[field_name] = parsed
        elif field_name == "base":
            section, dot, name = key.partition(".")
            if not dot or not name:
                raise ConfigError(f"--set {text!r}: expected base.section.key=value")
            out["base"] = _set(out.get("base") or {}, key, parsed)
        elif field_name in ("grid", "random", "variants"):
            out[field_name] = {**(out.get(field_name) or {}), key: parsed}
        else:
            raise ConfigError(f"--set {text!r}: only base, grid, random and variants take a key after the field")
    return out


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """A sweep file (with ``--set`` overrides), validated: every key and every value it may give a trial is
    checked as config now, so a typo fails before anything runs, naming the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    base_overrides = [o for o in overrides if o.strip().startswith("base.")]
    raw = apply_overrides(raw, [o for o in overrides if o not in base_overrides])
    allowed = {f for f in SweepSpec.__dataclass_fields__}
    unknown = sorted(set(raw) - allowed - {"config"})
    if unknown:
        raise ConfigError(f"{p}: unknown sweep key {unknown[0]!r}; allowed: {', '.join(sorted(allowed | {'config'}))}")
    base = raw.get("base") or {}
    if raw.get("config"):  # a config file the base overrides, relative to the sweep file
        base_file = (p.parent / raw["config"]).resolve()
        if not base_file.is_file():
            raise ConfigError(f"{p}: config {raw['config']!r} not found (looked for {base_file})")
        from qcrd_ray.config import _merge

        base = _merge(yaml.safe_load(base_file.read_text()) or {}, base)
    base = apply_overrides({"base": base}, base_overrides)["base"]  # over the config file's values too
    spec = SweepSpec(**{**{k: v for k, v in raw.items() if k != "config"}, "base": base,
                        "name": raw.get("name") or p.stem})
    for name, overrides in spec.variants.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{p}: variants.{name}: expected a mapping of section.key: value")
        for key, value in overrides.items():
            if not isinstance(key, str) or key.count(".") != 1:
                raise ConfigError(f"{p}: variants.{name}: key {key!r}: expected section.key")
            from_dict(_set(base, key, value))
    if spec.variants and spec.compare_on not in axes(spec):  # without variants: no method axis, no differences
        raise ConfigError(f"{p}: compare_on {spec.compare_on!r} is not a grid key (nor 'variant')")
    for key, values in {**spec.grid, **spec.random}.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigError(f"{p}: sweep key {key!r}: expected section.key (e.g. teacher.noise)")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid.{key}: expected a non-empty list of values")
        for value in values:
            from_dict(_set(base, key, value))  # raises ConfigError naming section.key
    for key, dist in spec.random.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in RANDOM_KINDS:
            raise ConfigError(f"{p}: random.{key}: expected one of {{{', '.join(RANDOM_KINDS)}: ...}}")
        kind, args = next(iter(dist.items()))
        for value in (args if kind == "choice" else args[:2]):
            from_dict(_set(base, key, value))
    if spec.metric not in METRICS:
        raise ConfigError(f"{p}: metric {spec.metric!r}: choose one of {', '.join(METRICS)}")
    if spec.num_samples < 1 or spec.max_concurrent_trials < 1:
        raise ConfigError(f"{p}: num_samples and max_concurrent_trials must be >= 1")
    return spec


def _grid(spec: SweepSpec) -> dict:
    return {"variant": list(spec.variants), **spec.grid} if spec.variants else dict(spec.grid)


def trial_count(spec: SweepSpec) -> int:
    """How many trials the sweep runs: every grid point, ``num_samples`` times."""
    return len(grid_points(spec)) * spec.num_samples


def axes(spec: SweepSpec) -> list[str]:
    """The keys a trial's row is labelled with: "variant" (when there are variants), the grid, random keys."""
    return list(_grid(spec)) + list(spec.random)


def grid_points(spec: SweepSpec) -> list[dict]:
    """Every combination of the grid's values (variants first), in file order (the last key varies fastest)."""
    grid = _grid(spec)
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def trial_name(point: dict) -> str:
    """A stable directory name for a trial: ``method=qcrd,noise=0.3,seed=1`` (the key's last part; a sampled
    float is rounded). A restored or rerun trial finds its own run directory by it."""
    parts = []
    for key, value in point.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.split('.')[-1]}={text}".replace("/", "_").replace(" ", ""))
    return ",".join(parts) or "base"


def trial_config(spec: SweepSpec, point: dict) -> Config:
    raw = spec.base
    for key, value in point.items():
        for k, v in (spec.variants[value].items() if key == "variant" else [(key, value)]):
            raw = _set(raw, k, v)
    raw = _set(raw, "train.experiment", spec.name)
    return from_dict(_set(raw, "train.run_name", trial_name(point)))


def teacher_key(cfg: Config) -> str:
    """Trials with the same key can share a teacher output: everything the teacher stage reads."""
    d = cfg.to_dict()
    data = {k: v for k, v in d["data"].items() if k != "eval_split"}
    text = json.dumps([data, d["teacher"], d["self_consistency"]], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---- statistics (pure)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def paired_difference(method: dict, baseline: dict) -> dict:
    """``method − baseline`` over the pairing values (seeds) both have: mean and a 95 % t interval (None with
    fewer than 2 pairs)."""
    from scipy import stats

    keys = sorted(set(method) & set(baseline), key=str)
    diffs = [method[k] - baseline[k] for k in keys]
    if not diffs:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "sd": None}
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "lo": None, "hi": None, "sd": None}
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"n": len(diffs), "mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd}


def pairs_for_half_width(sd: float, half_width: float, most: int = 10_000) -> int | None:
    """The fewest pairs (seeds) whose 95 % t interval of a paired difference with this ``sd`` is at most
    ± ``half_width`` wide: how many seeds a comparison needs to resolve an effect of that size. None: more than
    ``most``."""
    from scipy import stats

    if sd == 0:
        return 2
    for n in range(2, most + 1):
        if stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def cell_table(rows: list[dict], grid_keys: list[str], pair_by: str, baseline: str, column: str,
               compare_on: str = "train.method") -> list[dict]:
    """One line per cell (the grid keys other than ``pair_by``): n, mean ± sd of ``column`` and the paired
    difference to the cell with ``compare_on = baseline`` and the same other keys."""
    cell_keys = [k for k in grid_keys if k != pair_by]
    cells: dict[tuple, dict] = {}
    for row in rows:
        if row.get(column) is None:
            continue
        cells.setdefault(tuple(row[k] for k in cell_keys), {})[row.get(pair_by)] = row[column]
    out = []
    for cell, by_pair in cells.items():
        mean, sd = mean_sd(list(by_pair.values()))
        line = {**dict(zip(cell_keys, cell)), "n": len(by_pair), "mean": mean, "sd": sd}
        if compare_on in cell_keys:
            base_cell = tuple(baseline if k == compare_on else v for k, v in zip(cell_keys, cell))
            if base_cell != cell and base_cell in cells:
                line["diff"] = paired_difference(by_pair, cells[base_cell])
        out.append(line)
    return out


POOLED = "pooled"


def pooled_rows(rows: list[dict], over: str, pair_by: str) -> list[dict]:
    """``rows`` once more with ``over`` (e.g. teacher.noise) set to "pooled" and each pairing value made
    ``<level>/<seed>``, so :func:`cell_table` pairs every method with the baseline across all levels at once (one
    pair per level and seed): the pooled analysis of an effect the single levels are too few seeds to show.
    Empty when the rows do not span two levels of ``over``."""
    if len({r.get(over) for r in rows}) < 2:
        return []
    return [{**r, over: POOLED, pair_by: f"{r.get(over)}/{r.get(pair_by)}"} for r in rows]


def difference_series(rows: list[dict], grid_keys: list[str], pair_by: str, baseline: str, column: str,
                      compare_on: str, x: str) -> dict[str, list[dict]]:
    """Per value of ``compare_on`` other than ``baseline``: its paired difference to the baseline at each level of
    ``x`` (``{x, mean, lo, hi, n}``, levels in row order), what differences.png draws. Cells that differ in other
    keys than ``x`` are kept apart (their label joins those values)."""
    series: dict[str, list[dict]] = {}
    for line in cell_table(rows, grid_keys, pair_by, baseline, column, compare_on):
        d = line.get("diff")
        if not d or d["mean"] is None:
            continue
        label = ", ".join(str(line[k]) for k in grid_keys if k not in (pair_by, x))
        series.setdefault(label, []).append({"x": line.get(x), "mean": d["mean"], "lo": d["lo"], "hi": d["hi"],
                                             "n": d["n"]})
    return series


# ---- the Ray shell


def _teach_once(cfg: Config, shared: str) -> None:
    """Teach into ``shared`` unless another trial did; concurrent trials of one key wait on its lock."""
    from qcrd_ray.report import read_json
    from qcrd_ray.runs import join
    from qcrd_ray.teacher.pipeline import run_teacher

    os.makedirs(shared, exist_ok=True)
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_json(join(shared, "summary.json")) is None:
            run_teacher(cfg, shared)


def _evaluate_test(cfg: Config, result: dict) -> dict:
    from qcrd_ray.evaluate import evaluate
    from qcrd_ray.methods import method_spec
    from qcrd_ray.report import read_json
    from qcrd_ray.runs import MethodLayout, join

    where = MethodLayout.at(result["dir"])
    out = {}
    for mode in method_spec(cfg.train.method).eval_modes:
        metrics = read_json(join(where.eval("test", mode), "metrics.json"))
        if metrics is None:
            metrics = evaluate(where.model, cfg, "test", mode=mode, out_dir=where.eval("test", mode))
        out[mode] = metrics
    return out


def run_trial(point: dict, spec: SweepSpec, sweep_dir: str) -> dict:
    """One trial: teach (shared), train this trial's method, evaluate on valid and test; returns its row."""
    from qcrd_ray import trackers
    from qcrd_ray.pipeline import run_pipeline

    start = time.time()
    cfg = trial_config(spec, point)
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
           "wall_s": round(time.time() - start, 1)}
    for split in SPLITS:
        for mode in METRICS:
            m = evals[split].get(mode)
            row[f"{split}_{mode}"] = m["accuracy"] if m else None
    # valid went to the trackers with run_pipeline's evaluation; test joins it here
    trackers.log_results(cfg, method["dir"], {k: v for k, v in row.items() if k.startswith("test_")})
    return row


def _trainable(config: dict, spec_dict: dict, sweep_dir: str) -> None:
    import ray.tune

    ray.tune.report(run_trial(config["point"], SweepSpec(**spec_dict), sweep_dir))


def _param_space(spec: SweepSpec) -> dict:
    from ray import tune

    point = {k: tune.grid_search(v) for k, v in _grid(spec).items()}
    for key, dist in spec.random.items():
        kind, args = next(iter(dist.items()))
        point[key] = getattr(tune, kind)(args) if kind == "choice" else getattr(tune, kind)(*args[:2])
    return {"point": point}


def run_sweep(spec: SweepSpec, out: str, address: str | None = None) -> list[dict]:
    """Run (or continue) the sweep in ``out``; writes the tables, best.yaml and the plot; returns the rows."""
    from ray import tune

    from qcrd_ray import console
    from qcrd_ray.ray_utils import init_ray
    from qcrd_ray.storage import is_uri
    from qcrd_ray.sweep_console import TrialLines, tune_prints_to_log

    if is_uri(out):
        raise ConfigError(f"--out {out}: a sweep directory must be a path (a shared mount on a cluster): trials "
                          f"share teacher outputs through file locks")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    spec_file = os.path.join(out, "sweep.yaml")
    if os.path.exists(spec_file) and yaml.safe_load(Path(spec_file).read_text()) != _plain(asdict(spec)):
        raise ConfigError(f"{out} holds another sweep ({spec_file} differs); choose a new --out")
    Path(spec_file).write_text(yaml.safe_dump(_plain(asdict(spec)), sort_keys=False))
    init_ray(address)
    trainable = tune.with_resources(tune.with_parameters(_trainable, spec_dict=asdict(spec), sweep_dir=out),
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
        grid = tuner.fit()
    rows, errors, unfinished = [], [], []
    for result in grid:
        if result.error is not None:
            errors.append(f"{result.config.get('point')}: {result.error}")
        elif "trial" not in (result.metrics or {}):  # stopped (Ctrl-C) before it reported
            unfinished.append(result.config.get("point"))
        else:
            rows.append({k: v for k, v in result.metrics.items() if k in _row_keys(spec, result.metrics)})
    write_outputs(spec, out, rows)
    if errors or unfinished:
        first = errors[0] if errors else f"{unfinished[0]}: not finished"
        raise RuntimeError(f"{len(errors)} trial(s) failed and {len(unfinished)} did not finish (rerun the same "
                           f"command to continue): {first}")
    return rows


def rescore_valid(spec: SweepSpec, out: str, eval_size: int) -> list[dict]:
    """Every finished trial of the sweep in ``out`` (the rows of its results.csv) scored again in predict mode on
    ``eval_size`` fresh valid problems of the synthetic task; writes ``rescored-valid-<N>.csv`` and ``.md`` (the
    summary's tables for the new column beside the sweep's own valid predict) and returns the rows.

    Why: a testbed's 150-problem eval splits carry ±4 points of binomial noise per accuracy, as much as the effects
    in question; this separates that noise from the seed-to-seed spread of training. The problems are the valid
    split of the same task with ``data.synthetic_eval_size = eval_size``: the task's problem stream is test, valid,
    train, so they are disjoint from the trial's training and test problems when eval_size ≥ 2 × its eval size +
    its train size (checked). Scores are kept in each trial (``<method>/eval/valid<N>-predict``): a rerun scores
    only trials it has not scored."""
    from qcrd_ray.config import load_config
    from qcrd_ray.evaluate import evaluate
    from qcrd_ray.report import read_json
    from qcrd_ray.runs import MethodLayout, join

    results = os.path.join(out, "results.csv")
    if not os.path.exists(results):
        raise ConfigError(f"{out}: no results.csv (run the sweep first; every run of it writes one)")
    column = f"valid{eval_size}_predict"
    rows = []
    with open(results, newline="") as f:
        finished = [{k: yaml.safe_load(v) if v != "" else None for k, v in r.items()} for r in csv.DictReader(f)]
    for row in finished:
        run_dir = os.path.join(out, "trials", str(row["trial"]))
        cfg = load_config(os.path.join(run_dir, "config.yaml"))
        d = cfg.data
        if d.data_dir is not None or d.task != "synthetic":
            raise ConfigError(f"{row['trial']}: --rescore-valid needs the synthetic task (its eval splits have a "
                              f"size to choose); this trial reads {d.data_dir or d.task}")
        least = 2 * d.synthetic_eval_size + d.synthetic_train_size
        if eval_size < least:
            raise ConfigError(f"--rescore-valid {eval_size}: the problems would overlap the trials' training "
                              f"problems; use at least {least} (2 × eval size + train size)")
        where = MethodLayout.at(os.path.join(run_dir, cfg.train.method))
        metrics_dir = where.eval(f"valid{eval_size}", "predict")
        metrics = read_json(join(metrics_dir, "metrics.json"))
        if metrics is None:
            log.info("scoring %s on %d valid problems", row["trial"], eval_size)
            metrics = evaluate(where.model, cfg.replace(data={"synthetic_eval_size": eval_size}), "valid",
                               mode="predict", out_dir=metrics_dir)
        rows.append({**row, column: metrics["accuracy"]})
    columns = ["trial", *axes(spec), "valid_predict", column]
    with open(os.path.join(out, f"rescored-valid-{eval_size}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in columns} for r in rows)
    lines = [f"# Sweep {spec.name}: valid predict on {eval_size} problems, {len(rows)} trials\n",
             _summary_legend(spec)]
    lines += summary_table(spec, rows, "valid_predict", "valid predict (the sweep's own valid split)")
    lines += summary_table(spec, rows, column, f"valid predict, {eval_size} fresh problems")
    Path(out, f"rescored-valid-{eval_size}.md").write_text("\n".join(lines) + "\n")
    _plot_differences(spec, rows, column, f"valid predict, {eval_size} fresh problems",
                      os.path.join(out, f"rescored-valid-{eval_size}.png"))
    return rows


def _row_keys(spec: SweepSpec, metrics: dict) -> list[str]:
    return (["trial", *axes(spec), "teacher_accuracy", "wall_s"]
            + [f"{s}_{m}" for s in SPLITS for m in METRICS])


def _plain(obj):
    return json.loads(json.dumps(obj))


def percent(v) -> str:
    """An accuracy fraction as a percentage with one decimal; missing → "-"."""
    return "-" if v is None else f"{100 * v:.1f}"


def write_outputs(spec: SweepSpec, out: str, rows: list[dict]) -> None:
    """results.csv/.md, summary.md, best.yaml and accuracy.png from the finished trials' rows."""
    rows = sorted(rows, key=lambda r: r["trial"])
    columns = _row_keys(spec, {})
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in columns} for r in rows)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(percent(r.get(c)) if c.endswith(METRICS) or c == "teacher_accuracy" else str(r.get(c))
                             for c in columns) + " |" for r in rows]
    Path(out, "results.md").write_text("\n".join(md) + "\n")

    keys = axes(spec)
    summary = [f"# Sweep {spec.name}: {len(rows)} trials\n", _summary_legend(spec)]
    for split in SPLITS:
        for mode in METRICS:
            summary += summary_table(spec, rows, f"{split}_{mode}", f"{split} {mode}")
    Path(out, "summary.md").write_text("\n".join(summary) + "\n")

    valid = cell_table(rows, keys, spec.pair_by, spec.baseline, f"valid_{spec.metric}", spec.compare_on)
    if valid:
        best = max(valid, key=lambda line: line["mean"])
        cell = {k: best[k] for k in keys if k != spec.pair_by}
        Path(out, "best.yaml").write_text(yaml.safe_dump(
            {"chosen_on": f"valid {spec.metric} accuracy", "valid_mean": best["mean"], "cell": cell,
             "config": trial_config(spec, cell).to_dict()}, sort_keys=False))
    _plot(spec, rows, os.path.join(out, "accuracy.png"))
    _plot_differences(spec, rows, f"test_{spec.metric}", f"test {spec.metric}", os.path.join(out, "differences.png"))


def _summary_legend(spec: SweepSpec) -> str:
    return (f"Accuracy (%) per cell, mean ± sd over `{spec.pair_by}`; Δ = paired difference to "
            f"`{spec.compare_on} = {spec.baseline}` (by `{spec.pair_by}`) with its 95 % t interval and the sd of "
            f"the differences; \"pairs for ±{100 * RESOLVE:g}\" = the {spec.pair_by} values a 95 % interval that "
            f"narrow would need at that sd.\n")


def summary_table(spec: SweepSpec, rows: list[dict], column: str, title: str) -> list[str]:
    """summary.md's section for one accuracy ``column`` (markdown lines; none when no row has it)."""
    keys = axes(spec)
    pooled = pooled_rows(rows, spec.plot_x, spec.pair_by) if spec.plot_x in spec.grid else []
    table = cell_table(rows + pooled, keys, spec.pair_by, spec.baseline, column, spec.compare_on)
    if not table:
        return []
    cell_keys = [k for k in keys if k != spec.pair_by]
    lines = [f"\n## {title}\n", "| " + " | ".join(cell_keys) + f" | n | mean ± sd | Δ vs {spec.baseline} "
             f"[95 % CI] | sd of Δ | pairs for ±{100 * RESOLVE:g} |", "|" + "---|" * (len(cell_keys) + 5)]
    for line in table:
        d = line.get("diff")
        delta = "-" if not d or d["mean"] is None else (
            f"{100 * d['mean']:+.1f}" + (f" [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
                                         if d["lo"] is not None else "") + f" (n={d['n']})")
        spread = "- | -"
        if d and d.get("sd") is not None:
            need = pairs_for_half_width(d["sd"], RESOLVE)
            spread = f"{100 * d['sd']:.1f} | {need if need else '> 10000'}"
        lines.append("| " + " | ".join(str(line[k]) for k in cell_keys) +
                     f" | {line['n']} | {100 * line['mean']:.1f} ± {100 * line['sd']:.1f} | {delta} | {spread} |")
    return lines


def _plot(spec: SweepSpec, rows: list[dict], path: str) -> None:
    """Test accuracy against ``plot_x``, one line per method with its sd band (predict solid, explain dashed)."""
    if spec.plot_x not in spec.grid or not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    line_key = spec.compare_on
    methods = sorted({r.get(line_key, "?") for r in rows}, key=str)
    for i, method in enumerate(methods):
        for mode, style in (("predict", "-"), ("explain", "--")):
            xs, means, sds = [], [], []
            for x in spec.grid[spec.plot_x]:
                vals = [r[f"test_{mode}"] for r in rows if r.get(spec.plot_x) == x
                        and r.get(line_key, "?") == method and r.get(f"test_{mode}") is not None]
                if vals:
                    mean, sd = mean_sd(vals)
                    xs.append(x), means.append(100 * mean), sds.append(100 * sd)
            if xs:
                ax.errorbar(xs, means, yerr=sds, fmt=style + "o", color=f"C{i}", capsize=3,
                            label=f"{method} ({mode})")
    ax.set_xlabel(spec.plot_x)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"sweep {spec.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_differences(spec: SweepSpec, rows: list[dict], column: str, title: str, path: str) -> None:
    """Each method's paired difference to the baseline (points, 95 % t intervals) against ``plot_x``, side by
    side at each level: with a clean-DSS arm, H = clean-DSS − DSS next to QCRD − DSS."""
    if spec.plot_x not in spec.grid or not rows:
        return
    series = difference_series(rows, axes(spec), spec.pair_by, spec.baseline, column, spec.compare_on, spec.plot_x)
    if not series:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(spec.grid[spec.plot_x])
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(series)
    for i, (label, points) in enumerate(sorted(series.items())):
        xs = [levels.index(p["x"]) - 0.4 + width * (i + 0.5) for p in points]
        means = [100 * p["mean"] for p in points]
        errs = [[100 * (p["mean"] - p["lo"]) if p["lo"] is not None else 0 for p in points],
                [100 * (p["hi"] - p["mean"]) if p["hi"] is not None else 0 for p in points]]
        ax.errorbar(xs, means, yerr=errs, fmt="o", color=f"C{i}", capsize=3, label=f"{label} − {spec.baseline}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    ax.set_xlabel(spec.plot_x)
    ax.set_ylabel(f"Δ vs {spec.baseline}, points (95 % CI)")
    ax.set_title(f"sweep {spec.name}: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
