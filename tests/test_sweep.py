"""`qcrd sweep`: the pure parts (sweep files, trial names, teacher sharing keys, statistics, the pre-registered
decision rule) and a 2-trial sweep on Ray Tune end to end, interrupted and continued."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qcrd_ray.config import ConfigError
from qcrd_ray.sweep.decision import FAILS, INCONCLUSIVE, NO_HEADROOM, SUCCEEDS, decide, judge
from qcrd_ray.sweep.output import (format_difference, levels_and_pooled, plot_accuracy, summary_table, verdict_section,
                                   write_outputs)
from qcrd_ray.sweep.rescore import rescore_valid
from qcrd_ray.sweep.spec import grid_points, load_sweep, rationale_scores, teacher_key, trial_config, trial_name
from qcrd_ray.sweep.stats import (cell_table, difference_series, mean_interval, mean_sd, paired_difference,
                                  pairs_for_half_width, pooled_rows)
from qcrd_ray.testing import patience

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_grid_points_names_and_configs(tmp_path):
    spec = load_sweep(_write(tmp_path, """
name: q
base: {data: {synthetic_steps: 2}}
grid:
  train.method: [finetune, qcrd]
  teacher.noise: [0.1, 0.3]
  train.seed: [0, 1]
"""))
    points = grid_points(spec)
    assert len(points) == 8 and points[1] == {"train.method": "finetune", "teacher.noise": 0.1, "train.seed": 1}
    assert trial_name(points[1]) == "method=finetune,noise=0.1,seed=1"
    assert len({trial_name(p) for p in points}) == 8
    cfg = trial_config(spec, points[1])
    assert (cfg.train.method, cfg.teacher.noise, cfg.train.seed, cfg.data.synthetic_steps) == ("finetune", 0.1, 1, 2)
    assert (cfg.train.experiment, cfg.train.run_name) == ("q", "method=finetune,noise=0.1,seed=1")
    # trials differing only in method or student seed share a teacher output; another noise level does not
    keys = {(p["teacher.noise"], teacher_key(trial_config(spec, p))) for p in points}
    assert len(keys) == 2 and len({k for _, k in keys}) == 2


def test_the_committed_sweep_files_load():
    for name in ("quality", "ablation", "pilot", "quality_v2", "ablation_v2", "switches_v2", "pilot_v2"):
        spec = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
        assert spec.baseline == "dss" and grid_points(spec)


def test_the_pre_registered_v2_study_has_its_arms_levels_and_seeds():
    """Issue 21: testbed v2 at >= 2 noise levels x {finetune, dss, clean-DSS, qcrd} x >= 8 seeds, paired by seed;
    clean-DSS differs from DSS in its rationale rule alone; 1500 fresh valid problems stay clear of training."""
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    assert set(spec.variants) == {"finetune", "dss", "clean_dss", "qcrd"}
    assert len(spec.grid["teacher.noise"]) >= 2 and len(spec.grid["train.seed"]) >= 8
    assert spec.pair_by == "train.seed" and spec.plot_x == "teacher.noise"
    point = {"variant": "dss", "teacher.noise": 0.3, "train.seed": 0}
    dss, clean = trial_config(spec, point), trial_config(spec, {**point, "variant": "clean_dss"})
    assert dss.data.synthetic_version == 2 and clean.loss.dss_rationale == "gold"
    assert dss.replace(loss={"dss_rationale": "gold"}, train={"run_name": clean.train.run_name}) == clean
    assert teacher_key(dss) == teacher_key(clean)  # one teacher output for every arm of a noise level
    d = dss.data
    assert 2 * d.synthetic_eval_size + d.synthetic_train_size <= 1500
    for name in ("ablation_v2", "switches_v2"):
        other = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
        assert {"dss", "clean_dss"} <= set(other.variants) and len(other.grid["train.seed"]) >= 8
        assert all(trial_config(other, p).data.synthetic_version == 2 for p in grid_points(other))


@pytest.mark.parametrize("text, message", [
    ("grid: {teacher.noize: [0.1]}", "teacher.noize"),
    ("grid: {teacher.noise: [2.0]}", "teacher.noise"),
    ("grid: {noise: [0.1]}", "section.key"),
    ("grid: {teacher.noise: []}", "non-empty list"),
    ("random: {train.lr: {normal: [0, 1]}}", "uniform"),
    ("grd: {}", "unknown sweep key 'grd'"),
    ("metric: bleu", "metric"),
    ("grid: [teacher.noise]", "grid: expected a mapping"),
    ("random: {train.lr: {uniform: [0.1, 0.01]}}", r"lo < hi; got \[0.1, 0.01\]"),
    ("random: {train.lr: {uniform: [0.1]}}", "expected \\[lo, hi\\]"),
    ("random: {train.lr: {loguniform: [0, 0.01]}}", "loguniform: lo must be > 0"),
    ("random: {train.rounds: {uniform: [2, 8]}}", r"train.rounds: uniform draws numbers.*use \{choice"),
    ("random: {train.lr: {choice: []}}", "non-empty list"),
    ("num_samples: 3\ngrid: {train.seed: [0, 1]}", "put seeds in grid.train.seed"),
    # each value passes alone; together a trial's config is refused (the trial is named)
    ("compare_on: variant\ngrid: {teacher.min_actors: [1, 2]}\nvariants: {few: {teacher.max_actors: 1}}",
     r"trial variant=few,min_actors=2: teacher.min_actors \(2\) must be <= teacher.max_actors \(1\)"),
])
def test_bad_sweep_files_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path, text))


def test_set_overrides_the_grid_the_base_and_sweep_fields(tmp_path):
    """`qcrd sweep --set`: one noise level of the study, a shorter base, two trials at once; typos are refused."""
    path = _write(tmp_path, """
name: q
base: {train: {rounds: 8}}
grid:
  teacher.noise: [0.1, 0.3, 0.5]
  train.seed: [0, 1]
""")
    spec = load_sweep(path, ["grid.teacher.noise=[0.3]", "base.train.rounds=4", "max_concurrent_trials=2"])
    assert spec.grid == {"teacher.noise": [0.3], "train.seed": [0, 1]} and len(grid_points(spec)) == 2
    assert spec.base["train"]["rounds"] == 4 and spec.max_concurrent_trials == 2
    assert load_sweep(path).grid["teacher.noise"] == [0.1, 0.3, 0.5]  # the file itself is unchanged
    with pytest.raises(ConfigError, match="teacher.nois"):
        load_sweep(path, ["grid.teacher.nois=[0.3]"])
    with pytest.raises(ConfigError, match="train.rounds"):
        load_sweep(path, ["base.train.rounds=-1"])
    with pytest.raises(ConfigError, match="expected field"):
        load_sweep(path, ["grid.teacher.noise"])


def test_an_empty_grid_is_no_grid_and_set_reaches_one_key_of_a_variant(tmp_path):
    spec = load_sweep(_write(tmp_path, "compare_on: variant\nbaseline: plain\ngrid:\nvariants:\n"
                                       "  plain: {train.method: dss}\n  full: {train.method: qcrd}\n"))
    assert spec.grid == {} and [p["variant"] for p in grid_points(spec)] == ["plain", "full"]
    spec = load_sweep(tmp_path / "s.yaml", ["variants.full.loss.delta=2", "variants.extra={train.method: finetune}"])
    assert spec.variants == {"plain": {"train.method": "dss"}, "full": {"train.method": "qcrd", "loss.delta": 2},
                             "extra": {"train.method": "finetune"}}
    assert trial_config(spec, {"variant": "full"}).loss.delta == 2


def test_mean_sd_and_paired_difference_with_a_t_interval():
    assert mean_sd([0.5]) == (0.5, 0.0)
    mean, sd = mean_sd([1.0, 2.0, 3.0])
    assert mean == 2.0 and sd == 1.0
    # differences 1, 2, 3 by seed: mean 2, sd 1, t(0.975, 2) = 4.3027 → half width 4.3027 / sqrt(3) = 2.4841
    d = paired_difference({0: 2.0, 1: 4.0, 2: 6.0, 9: 1.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert d["n"] == 3 and d["mean"] == 2.0
    assert d["lo"] == pytest.approx(2 - 2.4841, abs=1e-4) and d["hi"] == pytest.approx(2 + 2.4841, abs=1e-4)
    assert d["sd"] == 1.0
    assert paired_difference({0: 1.0}, {0: 0.5}) == {"n": 1, "mean": 0.5, "lo": None, "hi": None, "sd": None}
    assert paired_difference({0: 1.0}, {1: 0.5})["n"] == 0
    assert mean_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.3027 / 3 ** 0.5), abs=1e-4)
    assert mean_interval([0.5]) == (0.5, 0.0)


def test_pairs_for_half_width_is_the_fewest_seeds_whose_interval_is_that_narrow():
    from scipy import stats

    def half(n, sd):
        return stats.t.ppf(0.975, n - 1) * sd / n ** 0.5

    for sd in (0.01, 0.038, 0.093):
        n = pairs_for_half_width(sd, 0.02)
        assert half(n, sd) <= 0.02 and (n == 2 or half(n - 1, sd) > 0.02)
    assert pairs_for_half_width(0.038, 0.02) == 17  # the quality grid's QCRD-DSS spread at noise 0.3 (1500 problems)
    assert pairs_for_half_width(0.0, 0.02) == 2
    assert pairs_for_half_width(10.0, 0.02, most=50) is None


def test_rescored_valid_problems_are_none_of_the_trained_or_tested_ones():
    """--rescore-valid N scores the valid split of the task with eval size N; its floor 2 x eval + train keeps
    those problems out of the trial's training (and test) problems."""
    from qcrd_ray.data.synthetic import make_split

    eval_size, train_size = 16, 48
    kw = {"steps": 2, "max_operand": 9}
    trained = {r["input"] for r in make_split("train", train_size=train_size, eval_size=eval_size, **kw)}
    tested = {r["input"] for r in make_split("test", train_size=train_size, eval_size=eval_size, **kw)}
    least = 2 * eval_size + train_size
    fresh = {r["input"] for r in make_split("valid", train_size=train_size, eval_size=least, **kw)}
    assert len(fresh) == least and not fresh & trained and not fresh & tested
    below = {r["input"] for r in make_split("valid", train_size=train_size, eval_size=least - 1, **kw)}
    assert below & trained  # one less and the last training problem is scored


def test_cell_table_pairs_each_method_with_the_baseline_of_the_same_noise():
    rows = []
    for noise, gain in ((0.1, 0.02), (0.5, 0.10)):
        for seed, base in enumerate((0.40, 0.44, 0.42)):
            rows.append({"train.method": "dss", "teacher.noise": noise, "train.seed": seed, "test_predict": base})
            rows.append({"train.method": "qcrd", "teacher.noise": noise, "train.seed": seed,
                         "test_predict": base + gain + 0.01 * seed})
    rows.append({"train.method": "qcrd", "teacher.noise": 0.5, "train.seed": 3, "test_predict": None})  # failed
    table = cell_table(rows, ["train.method", "teacher.noise", "train.seed"], "train.seed", "dss", "test_predict")
    by_cell = {(line["train.method"], line["teacher.noise"]): line for line in table}
    assert len(by_cell) == 4 and "diff" not in by_cell[("dss", 0.1)]
    high = by_cell[("qcrd", 0.5)]
    assert high["n"] == 3 and high["mean"] == pytest.approx(0.53)
    assert high["diff"]["mean"] == pytest.approx(0.11) and high["diff"]["lo"] > 0
    assert by_cell[("qcrd", 0.1)]["diff"]["mean"] == pytest.approx(0.03)


def test_a_difference_says_how_many_of_its_pairs_trained_on_unlike_machines():
    """The follow-ups' seed 2: its switch arms trained on another machine than its DSS (the same config and seed
    gave 86.0 there and 90.7 here), so those pairs mix the method with the machine, and the tables say so."""
    avx2, avx512 = "AMD EPYC · AVX2 · 1 threads", "AMD EPYC · AVX512 · 1 threads"
    rows = [{"variant": v, "train.seed": seed, "valid_predict": 0.8 + 0.01 * seed,
             "machine": avx512 if (v == "margin_sum" and seed == 2) else avx2 if seed != 1 else None}
            for v in ("dss", "margin_sum") for seed in range(3)]
    diff = cell_table(rows, ["variant", "train.seed"], "train.seed", "dss", "valid_predict", "variant")[1]["diff"]
    assert (diff["n"], diff["across_machines"]) == (3, 1)  # seed 1 recorded no machine: not counted as unlike
    assert format_difference(diff) == "+0.0 [+0.0, +0.0] (n=3, 1 across machines)"
    assert format_difference({**diff, "across_machines": 0}) == "+0.0 [+0.0, +0.0] (n=3)"


SWEEP = """
name: two
base:
  data: {synthetic_train_size: 48, synthetic_eval_size: 16, synthetic_steps: 2}
  teacher: {k: 3, shard_rows: 32, noise: 0.2}
  student: {max_target_len: 64}
  train: {rounds: 2, round_steps: 3, batch_size: 4, log_every: 1}
  snapshots: {j: 1, max_new_tokens: 24}
  discriminator: {pretrain_steps: 5, refresh_steps: 2}
grid:
  train.method: [finetune, qcrd]
  train.seed: [0]
baseline: finetune
"""


@pytest.mark.slow
@pytest.mark.ray
def test_two_trial_sweep_survives_a_killed_driver_and_finishes(ray_session, tmp_path, capsys):
    """Trial 1 finishes, the driver is SIGKILLed during trial 2, the same command continues: trial 1 is not
    trained again, the teacher was taught once for both, and the tables, best config and plot are written.
    Trial 2 is QCRD: its negative samplers and snapshot store must find CPUs outside the trial's placement group."""
    from qcrd_ray.cli import main

    sweep_file, out = _write(tmp_path, SWEEP), tmp_path / "sweep"
    first = out / "trials" / "method=finetune,seed=0"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    command = "import sys; from qcrd_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    driver = subprocess.Popen([sys.executable, "-c", command, "sweep", "--config", str(sweep_file),
                               "--out", str(out)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # ~1 min on an idle 2-core machine; minutes at a load average of 30
        deadline = time.monotonic() + patience(600)
        while not (first / "finetune" / "eval" / "test-predict" / "metrics.json").exists():
            assert driver.poll() is None, "the sweep ended before its first trial finished"
            assert time.monotonic() < deadline, f"the first trial did not finish in {patience(600):.0f} s"
            time.sleep(1)
        while not (out / "trials" / "method=qcrd,seed=0").exists():  # trial 2 under way: Tune recorded trial 1
            assert driver.poll() is None, "the sweep ended before its second trial started"
            assert time.monotonic() < deadline, "the second trial did not start"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    model = first / "finetune" / "model" / "config.json"
    trained_at = model.stat().st_mtime_ns

    capsys.readouterr()
    record = tmp_path / "committed" / "ledger.jsonl"  # continued with a ledger: both trials are added to it
    assert main(["sweep", "--config", str(sweep_file), "--out", str(out), "--ledger", str(record)]) == 0
    assert model.stat().st_mtime_ns == trained_at
    # the continued sweep says what each trial did (its restored Tune callback), and Tune's prints went to the log
    console_out = capsys.readouterr().out
    assert "continuing the sweep in" in console_out and "trial method=qcrd,seed=0: started" in console_out
    assert re.search(r"trial method=qcrd,seed=0: valid predict \d+\.\d %, test predict \d+\.\d % in \d+:\d\d "
                     r"\(2/2 trials done\)", console_out), console_out
    assert "Configuration for experiment" not in console_out and "View detailed results" not in console_out
    assert "View detailed results" in (out / "logs" / "qcrd.log").read_text()
    assert len([p for p in (out / "teachers").iterdir() if p.is_dir()]) == 1  # one teacher for both trials
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["train.method"] for r in rows) == ["finetune", "qcrd"]
    # both trained on this machine: one fingerprint, and no warning about unlike machines
    assert len({r["machine"] for r in rows}) == 1 and torch.backends.cpu.get_cpu_capability() in rows[0]["machine"]
    for row in rows:
        for column in ("valid_predict", "test_predict", "test_explain" if row["train.method"] == "qcrd" else None):
            if column:
                assert 0.0 <= float(row[column]) <= 1.0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["chosen_on"] == "valid predict accuracy" and best["cell"]["train.method"] in ("finetune", "qcrd")
    summary = (out / "summary.md").read_text()
    assert "## test predict" in summary and "| qcrd |" in summary
    assert "unlike machines" not in summary
    assert (out / "results.md").read_text().count("\n") == 4

    # the finished trials scored again on more valid problems, without Ray; once per trial
    with pytest.raises(ConfigError, match="at least 80"):
        rescore_valid(load_sweep(sweep_file), str(out), 79)
    assert main(["sweep", "--config", str(sweep_file), "--out", str(out), "--rescore-valid", "80"]) == 0
    metrics = first / "finetune" / "eval" / "valid80-predict" / "metrics.json"
    scored_at = metrics.stat().st_mtime_ns
    rescored = rescore_valid(load_sweep(sweep_file), str(out), 80)
    assert metrics.stat().st_mtime_ns == scored_at
    own = json.loads((first / "finetune" / "eval" / "valid-predict" / "metrics.json").read_text())
    assert own["n"] == 16  # the trial's own valid split is left as it was (the sweep's tables read it)
    assert sorted(r["train.method"] for r in rescored) == ["finetune", "qcrd"]
    assert all(0.0 <= r["valid80_predict"] <= 1.0 for r in rescored)
    report = (out / "rescored-valid-80.md").read_text()
    assert "## valid predict, 80 fresh problems" in report and "| qcrd | 1 |" in report

    # the sweep directory is lost (a new cluster, a fresh checkout): the ledger it left continues it elsewhere,
    # every trial taken from it, none trained; the rescore's column comes back from it too
    assert main(["sweep", "--config", str(sweep_file), "--out", str(out), "--rescore-valid", "80",
                 "--ledger", str(record)]) == 0
    assert sorted(e["scores"]["valid80_predict"] for e in map(json.loads, record.read_text().splitlines())) == \
        sorted(r["valid80_predict"] for r in rescored)
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    assert main(["sweep", "--config", str(sweep_file), "--out", str(elsewhere), "--ledger", str(record)]) == 0
    console_out = capsys.readouterr().out
    assert f"ledger {record}: 2 of 2 trials recorded there are taken from it" in console_out
    assert "trial method=qcrd,seed=0: valid predict" in console_out and "from the ledger (" in console_out
    assert not (elsewhere / "trials").exists() and not (elsewhere / "teachers").exists()
    with open(elsewhere / "results.csv") as f:
        assert list(csv.DictReader(f)) == rows
    again = rescore_valid(load_sweep(sweep_file), str(elsewhere), 80, str(record))
    assert [r["valid80_predict"] for r in again] == [r["valid80_predict"] for r in rescored]


def test_variants_are_one_more_axis_compared_to_their_baseline(tmp_path):
    spec = load_sweep(_write(tmp_path, """
variants:
  dss: {train.method: dss}
  no_judge: {train.method: qcrd, loss.quality_judge: false}
grid: {train.seed: [0, 1]}
compare_on: variant
"""))
    points = grid_points(spec)
    assert points[0] == {"variant": "dss", "train.seed": 0} and len(points) == 4
    cfg = trial_config(spec, points[3])
    assert (cfg.train.method, cfg.loss.quality_judge, cfg.train.seed) == ("qcrd", False, 1)
    assert trial_name(points[3]) == "variant=no_judge,seed=1"
    with pytest.raises(ConfigError, match="loss.quality_judg"):
        load_sweep(_write(tmp_path, "variants: {a: {loss.quality_judg: false}}\ncompare_on: variant"))
    with pytest.raises(ConfigError, match="compare_on"):
        load_sweep(_write(tmp_path, "variants: {a: {train.seed: 1}}\ncompare_on: train.method"))


@pytest.mark.parametrize("path", [p for p in sorted((ROOT / "sweeps").glob("*.yaml"))
                                  if not p.name.startswith("testbed")],
                         ids=lambda p: p.name)  # testbed*.yaml: the base configs the sweeps share, not sweeps
def test_every_committed_sweep_file_expands_to_valid_trial_configs(path):
    """The README's reproduce commands read these files: each loads, and every trial's config validates."""
    spec = load_sweep(path)
    points = grid_points(spec)
    assert points and len({trial_name(p) for p in points}) == len(points)
    for point in points:
        trial_config(spec, point)  # raises ConfigError on a bad key or value


def test_a_finished_trial_line_gives_its_scores_time_and_the_count():
    from qcrd_ray.sweep.tune import trial_line

    row = {"trial": "variant=spec_d,seed=1", "wall_s": 902.2, "valid_predict": 0.54, "test_predict": 0.46,
           "valid_explain": 0.34}
    assert trial_line(row, "predict", 3, 9) == (
        "trial variant=spec_d,seed=1: valid predict 54.0 %, test predict 46.0 % in 15:02 (3/9 trials done)")
    assert "test explain - %" in trial_line(row, "explain", 3, 9)  # not evaluated (yet): no number made up


def test_tune_prints_go_to_the_log_as_whole_lines_and_stay_on_the_console_when_verbose(caplog):
    from qcrd_ray import console
    from qcrd_ray.sweep.tune import tune_prints_to_log

    out = io.StringIO()
    with console.session(out=out, err=io.StringIO()), caplog.at_level(logging.INFO, logger="ray.tune"):
        with tune_prints_to_log():
            print("View detailed results here:", end=" ")
            print("/sweep/tune\n")
            console.summary("trial a: started (1 running)")
            print("Tune done", end="")
    assert [r.getMessage() for r in caplog.records if r.name == "ray.tune"] == [
        "View detailed results here: /sweep/tune", "Tune done"]
    assert "View detailed" not in out.getvalue() and "trial a: started" in out.getvalue()

    out = io.StringIO()
    with console.session(verbose=True, out=out, err=io.StringIO()), contextlib.redirect_stdout(out):
        with tune_prints_to_log():
            print("View detailed results here: /sweep/tune")
    assert "View detailed results here" in out.getvalue()


def _headroom_rows():
    """dss / clean_dss / qcrd at two noise levels x 3 seeds: H = clean − dss = +4 / +10, QCRD − DSS = +1 / +6."""
    rows = []
    for noise, h, q in ((0.3, 0.04, 0.01), (0.6, 0.10, 0.06)):
        for seed, base in enumerate((0.40, 0.46, 0.43)):
            wobble = 0.01 * (seed - 1)
            rows += [{"variant": "dss", "teacher.noise": noise, "train.seed": seed, "acc": base},
                     {"variant": "clean_dss", "teacher.noise": noise, "train.seed": seed, "acc": base + h + wobble},
                     {"variant": "qcrd", "teacher.noise": noise, "train.seed": seed, "acc": base + q - wobble}]
    return rows


def test_difference_series_puts_the_headroom_next_to_qcrd_minus_dss():
    keys = ["variant", "teacher.noise", "train.seed"]
    series = difference_series(_headroom_rows(), keys, "train.seed", "dss", "acc", "variant", "teacher.noise")
    assert set(series) == {"clean_dss", "qcrd"}
    h, q = ({p["x"]: p for p in series[name]} for name in ("clean_dss", "qcrd"))
    assert h[0.3]["mean"] == pytest.approx(0.04) and h[0.6]["mean"] == pytest.approx(0.10)
    assert q[0.6]["mean"] == pytest.approx(0.06) and q[0.6]["n"] == 3
    # the same intervals as the paired difference itself
    expected = paired_difference({0: 0.49, 1: 0.56, 2: 0.54}, {0: 0.40, 1: 0.46, 2: 0.43})
    assert h[0.6]["lo"] == pytest.approx(expected["lo"]) and h[0.6]["hi"] == pytest.approx(expected["hi"])


def test_pooled_rows_pair_every_level_and_seed_at_once():
    rows = _headroom_rows()
    pooled = pooled_rows(rows, "teacher.noise", "train.seed")
    assert len(pooled) == len(rows) and {r["teacher.noise"] for r in pooled} == {"pooled"}
    table = cell_table(pooled, ["variant", "teacher.noise", "train.seed"], "train.seed", "dss", "acc", "variant")
    by = {line["variant"]: line for line in table}
    assert by["clean_dss"]["diff"]["n"] == 6 and by["clean_dss"]["diff"]["mean"] == pytest.approx(0.07)
    assert by["qcrd"]["diff"]["mean"] == pytest.approx(0.035)
    assert pooled_rows([r for r in rows if r["teacher.noise"] == 0.3], "teacher.noise", "train.seed") == []
    # a summary table carries the pooled line after the levels
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    lines = summary_table(spec, [{**r, "valid_predict": r["acc"]} for r in rows], "valid_predict", "valid predict")
    assert any(line.startswith("| clean_dss | pooled | 6 |") for line in lines)


# the pre-registered decision rule (qcrd_ray/sweep/decision.py; docs/quality.md)

def _d(mean, lo, hi, sd=0.03, n=8):
    return {"n": n, "mean": mean, "lo": lo, "hi": hi, "sd": sd}


HEADROOM = _d(0.06, 0.03, 0.09)  # headroom established: ≥ +2 with its interval above 0


@pytest.mark.parametrize("headroom, effect, verdict, reason", [
    # rule 1: H's upper bound below +2, whatever the method did
    (_d(0.005, -0.005, 0.015), _d(0.05, 0.03, 0.07), NO_HEADROOM, "cannot show"),
    (_d(-0.04, -0.07, -0.01), _d(0.0, -0.02, 0.02), NO_HEADROOM, "below +2"),
    # rule 3 on H: it spans 0 (and could reach +2), or it is above 0 but under +2
    (_d(0.02, -0.01, 0.05), _d(0.05, 0.03, 0.07), INCONCLUSIVE, "H's interval spans 0"),
    (_d(0.015, 0.005, 0.025), _d(0.05, 0.03, 0.07), INCONCLUSIVE, "mean is below +2"),
    # rule 2 with H established
    (HEADROOM, _d(0.04, 0.01, 0.07), SUCCEEDS, "recovers 67% of H"),
    (HEADROOM, _d(0.03, 0.01, 0.05), SUCCEEDS, "recovers 50% of H"),  # exactly half is enough
    (HEADROOM, _d(0.025, 0.005, 0.045), FAILS, "under half"),
    (HEADROOM, _d(0.015, 0.005, 0.025), FAILS, "not ≥ +2"),
    (HEADROOM, _d(-0.03, -0.05, -0.01), FAILS, "not ≥ +2"),
    # rule 3 on the method: its interval spans 0 → never "no effect"
    (HEADROOM, _d(0.01, -0.015, 0.035), INCONCLUSIVE, "Δ's interval spans 0"),
    (HEADROOM, _d(0.05, None, None, sd=None, n=1), INCONCLUSIVE, "fewer than 2 pairs"),
    (None, _d(0.05, 0.03, 0.07), INCONCLUSIVE, "H has fewer than 2 pairs"),
])
def test_the_rule_gives_each_verdict_with_its_reason(headroom, effect, verdict, reason):
    got, why = judge(headroom, effect, 0.02)
    assert got == verdict and reason in why


def test_an_inconclusive_verdict_says_how_many_seeds_a_2_point_interval_needs():
    # sd of the differences 3.8 points: a ±2 interval needs 17 pairs (stats.pairs_for_half_width)
    _, why = judge(HEADROOM, _d(0.01, -0.02, 0.04, sd=0.038), 0.02)
    assert "needs 17 pairs" in why


def test_the_threshold_is_the_sweep_files_not_a_constant():
    effect = _d(0.04, 0.02, 0.06)
    assert judge(HEADROOM, effect, 0.02)[0] == SUCCEEDS
    assert judge(HEADROOM, effect, 0.05)[0] == FAILS  # +4 is short of a +5 threshold


def test_decide_judges_each_method_per_level_and_pooled_from_the_paired_differences():
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    verdicts = decide(levels_and_pooled(spec, _headroom_rows(), "acc"), "variant", "clean_dss", ["qcrd"], 0.02)
    by_level = {v.group["teacher.noise"]: v for v in verdicts}
    assert set(by_level) == {0.3, 0.6, "pooled"} and {v.method for v in verdicts} == {"qcrd"}
    # at 0.3: H = +4 [+1.5, +6.5] is established, QCRD − DSS = +1 [−1.5, +3.5] spans 0
    low = by_level[0.3]
    assert low.verdict == INCONCLUSIVE and low.headroom["mean"] == pytest.approx(0.04)
    expected = paired_difference({0: 0.42, 1: 0.47, 2: 0.43}, {0: 0.40, 1: 0.46, 2: 0.43})
    assert {k: pytest.approx(v) for k, v in {**expected, "across_machines": 0}.items()} == low.effect
    # at 0.6: QCRD − DSS = +6 [+3.5, +8.5] recovers 60 % of H = +10
    assert by_level[0.6].verdict == SUCCEEDS and "60%" in by_level[0.6].why
    assert by_level["pooled"].headroom["n"] == 6


def test_the_verdict_table_is_written_only_for_a_sweep_with_a_decision(tmp_path):
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    lines = verdict_section(spec, [{**r, "v": r["acc"]} for r in _headroom_rows()], "v", "valid predict, 1500 problems")
    assert lines[0].strip() == "## Verdict on valid predict, 1500 problems: the pre-registered rule"
    table = [line for line in lines if line.startswith("| 0.") or line.startswith("| pooled")]
    assert len(table) == 3
    assert table[1].startswith("| 0.6 | qcrd | +10.0 [") and "**succeeds**" in table[1]
    assert "**inconclusive**" in table[0]
    plain = tmp_path / "s.yaml"
    plain.write_text("variants: {dss: {train.method: dss}, qcrd: {train.method: qcrd}}\ncompare_on: variant\n"
                     "grid: {train.seed: [0, 1]}\n")
    assert verdict_section(load_sweep(plain), _headroom_rows(), "acc", "x") == []


def test_summary_reads_the_rule_on_every_score_and_names_the_primary(tmp_path):
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    rows = [{"trial": f"{r['variant']},{r['teacher.noise']},{r['train.seed']}", **r, "valid_predict": r["acc"],
             "test_explain": r["acc"] - 0.2} for r in _headroom_rows()]
    write_outputs(spec, str(tmp_path), rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "its primary score is valid predict on fresh problems (`--rescore-valid N`" in summary
    assert "## Verdict on valid predict: the pre-registered rule" in summary
    assert "## Verdict on test explain: the pre-registered rule" in summary
    assert "Verdict on test predict" not in summary  # no trial has that score
    explain = summary.split("## Verdict on test explain")[1]
    assert "| 0.6 | qcrd | +10.0 [" in explain and "**succeeds**" in explain


def test_rationale_checks_get_columns_and_tables_only_where_trials_have_them(tmp_path):
    """results.csv and summary.md carry a rationale check (testbed v2's explain-mode diagnosis) per split where a
    trial has it, with the accuracy tables' Δ vs the baseline; a task without checks gets no empty columns."""
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    rows = [{"trial": f"{r['variant']},{r['teacher.noise']},{r['train.seed']}", **r, "valid_predict": r["acc"]}
            for r in _headroom_rows()]
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    plain.mkdir(), checked.mkdir()
    write_outputs(spec, str(plain), rows)
    with open(plain / "results.csv", newline="") as f:
        assert not [c for c in next(csv.reader(f)) if "rationale" in c]
    assert "rationales" not in (plain / "summary.md").read_text()

    # each row as run_trial makes it from evaluate's metrics ({check: {share, n}}) on the valid split
    write_outputs(spec, str(checked), [{**r, **rationale_scores("valid", {"trap_operation": {"share": r["acc"] + 0.2,
                                                                                              "n": 40}})}
                                       for r in rows])
    with open(checked / "results.csv", newline="") as f:
        assert [c for c in next(csv.reader(f)) if "rationale" in c] == ["valid_rationale_trap_operation"]
    summary = (checked / "summary.md").read_text()
    section = summary.split("## valid rationales: trap operation (% of those it applies to)")[1]
    table = section.split("## ")[0]
    assert "| clean_dss | 0.6 | 3 | 73.0 ± 3.6 | +10.0 [+7.5, +12.5] (n=3) |" in table
    assert "| qcrd | pooled | 6 | 66.5 ± 3.6 | +3.5 [+0.5, +6.5] (n=6) |" in table
    assert "| clean_dss,0.3,0 | clean_dss | 0.3 | 0 | - | - | - | 43.0 | - | - | - | 63.0 |" in \
        (checked / "results.md").read_text()  # a share, shown in percent


@pytest.mark.parametrize("decision, message", [
    ("{control: clean, methods: [qcrd]}", "'clean' is not a variant"),
    ("{control: clean_dss, methods: [dss]}", "other than the baseline 'dss'"),
    ("{control: clean_dss, methods: []}", "non-empty list"),
    ("{control: clean_dss, methods: [qcrd], min_effect: 2}", "min_effect"),
    ("{control: clean_dss, methods: [qcrd], threshold: 0.02}", "decision.threshold: unknown"),
    ("[clean_dss]", "expected a mapping"),
])
def test_a_bad_decision_is_refused_when_the_sweep_file_loads(tmp_path, decision, message):
    path = tmp_path / "s.yaml"
    path.write_text("variants: {dss: {train.method: dss}, clean_dss: {train.method: dss, loss.dss_rationale: gold},"
                    f" qcrd: {{train.method: qcrd}}}}\ncompare_on: variant\ngrid: {{train.seed: [0, 1]}}\n"
                    f"decision: {decision}\n")
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_the_committed_v2_sweeps_judge_every_method_against_the_clean_dss_headroom():
    for name, methods in (("quality_v2", ["qcrd"]),
                          ("ablation_v2", ["sc_positives", "teacher_negatives", "student_negatives", "quality_judge"]),
                          ("switches_v2", ["qcrd", "margin_sum", "within_margin", "both"])):
        spec = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
        assert spec.decision == {"control": "clean_dss", "methods": methods, "min_effect": 0.02}
        assert {spec.baseline, "clean_dss", *methods} <= set(spec.variants)


def test_a_sweep_directory_continues_under_a_new_decision_but_not_under_other_trials(tmp_path):
    """out/sweep.yaml guards a sweep directory against another sweep's trials; naming a decision rule later (it
    only reads results) is not another sweep: the quality_v2 study was started before its file named one."""
    from qcrd_ray.sweep.tune import record_sweep

    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    without = load_sweep(ROOT / "sweeps" / "quality_v2.yaml", ["decision={}"])
    record_sweep(without, str(tmp_path))
    record_sweep(spec, str(tmp_path))  # the same trials, a rule added
    assert yaml.safe_load((tmp_path / "sweep.yaml").read_text())["decision"]["control"] == "clean_dss"
    with pytest.raises(ConfigError, match="records other grid than"):
        record_sweep(load_sweep(ROOT / "sweeps" / "quality_v2.yaml", ["grid.train.seed=[0, 1]"]), str(tmp_path))
    # Tuner.restore keeps the stored scheduling: a changed one would be ignored, so it is refused by name
    with pytest.raises(ConfigError, match="records other max_concurrent_trials"):
        record_sweep(load_sweep(ROOT / "sweeps" / "quality_v2.yaml", ["max_concurrent_trials=7"]), str(tmp_path))


def test_rescore_refuses_a_sweep_file_whose_trials_differ_from_the_directorys(tmp_path):
    """--rescore-valid looks trials up in the ledger by the configs of the spec it is given, and files its scores
    under them: with other --set options than the sweep ran with, it would file them under other trials."""
    from qcrd_ray.sweep.tune import record_sweep

    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml", ["grid.train.seed=[0]"])
    record_sweep(spec, str(tmp_path))
    (tmp_path / "results.csv").write_text("trial\n")
    other = load_sweep(ROOT / "sweeps" / "quality_v2.yaml", ["grid.train.seed=[0]", "base.train.rounds=2"])
    with pytest.raises(ConfigError, match="records other base than this sweep file"):
        rescore_valid(other, str(tmp_path), 1500)
    # what only reads the results may differ: a later rule, a plot axis, the scheduling
    same = load_sweep(ROOT / "sweeps" / "quality_v2.yaml", ["grid.train.seed=[0]", "max_concurrent_trials=1",
                                                           "plot_x=train.seed", "decision={}"])
    assert rescore_valid(same, str(tmp_path), 1500) == []


def test_the_accuracy_plot_draws_any_score_column_per_method_and_level(tmp_path, monkeypatch):
    """rescored-valid-N-accuracy.png: the primary score per arm against noise, mean and 95 % CI over seeds."""
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda ax, x, y, **kw: drawn.append((kw["label"], list(x), list(y), kw["yerr"])) or
                        real(ax, x, y, **kw))
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    path = tmp_path / "a.png"
    plot_accuracy(spec, _headroom_rows(), str(path), ("acc",), "valid predict (%)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by = {label: (x, y, err) for label, x, y, err in drawn}
    assert set(by) == {"clean_dss", "dss", "qcrd"}
    x, y, err = by["dss"]
    assert x == [0.3, 0.6] and y == pytest.approx([43.0, 43.0])
    assert err == pytest.approx([100 * mean_interval([0.40, 0.46, 0.43])[1]] * 2)


def test_a_method_has_one_colour_in_every_plot_of_a_sweep(tmp_path, monkeypatch):
    """differences.png leaves the baseline out; its QCRD must still be the accuracy plot's QCRD colour."""
    import matplotlib.axes

    from qcrd_ray.sweep.output import plot_differences

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda ax, x, y, **kw: drawn.append((kw["label"], kw["color"])) or real(ax, x, y, **kw))
    spec = load_sweep(ROOT / "sweeps" / "quality_v2.yaml")
    plot_accuracy(spec, _headroom_rows(), str(tmp_path / "a.png"), ("acc",), "valid predict (%)")
    plot_differences(spec, _headroom_rows(), "acc", "valid predict", str(tmp_path / "d.png"))
    colours = dict(drawn[:3])
    assert dict(drawn[3:]) == {"clean_dss − dss": colours["clean_dss"], "qcrd − dss": colours["qcrd"]}
    assert len(set(colours.values())) == 3
