"""`qcrd sweep --ledger`: the record of finished trials that outlives a sweep directory (sweep/ledger.py), without
Ray. The sweep end to end with a ledger is in tests/test_sweep.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from qcrd_ray import storage
from qcrd_ray.config import ConfigError
from qcrd_ray.data.synthetic import answer_v2, make_split, parse_v2
from qcrd_ray.sweep import ledger
from qcrd_ray.sweep.rescore import rescore_valid
from qcrd_ray.sweep.spec import load_sweep, trial_config
from qcrd_ray.sweep.tune import run_trial, trial_line

ROOT = Path(__file__).resolve().parents[1]
ABLATION, SWITCHES = (load_sweep(ROOT / "sweeps" / f"{name}.yaml") for name in ("ablation_v2", "switches_v2"))


def _hash(spec, variant, seed=0):
    return ledger.config_hash(trial_config(spec, {"variant": variant, "train.seed": seed}))


def test_the_two_follow_ups_share_their_dss_clean_dss_and_qcrd_trials_and_nothing_else():
    """One ledger for both follow-ups trains each shared arm once: the same config under another sweep's name,
    trial name and variant label has the same hash; another seed or loss switch does not."""
    for a, s in (("dss", "dss"), ("clean_dss", "clean_dss"), ("quality_judge", "qcrd")):
        assert _hash(ABLATION, a, 3) == _hash(SWITCHES, s, 3)
    ablation = {_hash(ABLATION, v, seed) for v in ABLATION.variants for seed in range(8)}
    switches = {_hash(SWITCHES, v, seed) for v in SWITCHES.variants for seed in range(8)}
    assert len(ablation) == len(switches) == 48 and len(ablation | switches) == 72
    assert len({_hash(SWITCHES, v) for v in ("qcrd", "margin_sum", "within_margin", "both")}) == 4
    other = ledger.config_hash(trial_config(SWITCHES, {"variant": "qcrd", "train.seed": 0}).replace(
        train={"lr": 1e-3}))
    assert other != _hash(SWITCHES, "qcrd")


def _row(trial, variant, seed, **scores):
    return {"trial": trial, "variant": variant, "train.seed": seed, "wall_s": 60.0, "machine": "cpu",
            "valid_predict": 0.5, "test_predict": 0.4, "valid_explain": 0.3, "test_explain": 0.2, **scores}


def test_rows_are_recorded_once_per_config_and_gain_later_scores(tmp_path):
    where = str(tmp_path / "results" / "v2.jsonl")  # its folder is made
    assert ledger.read(where) == {} and ledger.read(None) == {}
    rows = [_row("variant=dss,seed=0", "dss", 0), _row("variant=quality_judge,seed=0", "quality_judge", 0)]
    assert ledger.add_rows(where, ABLATION, rows) == 2
    # the switches sweep finishes its qcrd seed 0 (the ablation's quality_judge) again, then a rescore adds a score
    again = _row("variant=qcrd,seed=0", "qcrd", 0, valid1500_predict=0.61)
    assert ledger.add_rows(where, SWITCHES, [again]) == 2
    entries = ledger.read(where)
    qcrd = entries[_hash(SWITCHES, "qcrd")]
    assert qcrd["trained_in"] == "ablation_v2/variant=quality_judge,seed=0"  # the first record names where
    assert qcrd["scores"]["valid1500_predict"] == 0.61 and qcrd["scores"]["valid_predict"] == 0.5
    assert "variant" not in qcrd["scores"] and "train.seed" not in qcrd["scores"]  # labels are the sweep's own
    lines = storage.read_jsonl(where)
    assert [e["trained_in"] for e in lines] == sorted(e["trained_in"] for e in lines)


def test_a_recorded_trial_is_taken_from_the_ledger_under_this_sweeps_labels_and_not_trained(tmp_path):
    where = str(tmp_path / "v2.jsonl")
    ledger.add_rows(where, ABLATION, [_row("variant=quality_judge,seed=2", "quality_judge", 2)])
    point = {"variant": "qcrd", "train.seed": 2}
    row = run_trial(point, SWITCHES, str(tmp_path / "sweep"), ledger.read(where))
    assert row["trial"] == "variant=qcrd,seed=2" and row["variant"] == "qcrd" and row["valid_predict"] == 0.5
    assert not (tmp_path / "sweep").exists()  # nothing taught, trained or evaluated
    line = trial_line(row, "predict", 3, 48)
    assert line == ("trial variant=qcrd,seed=2: valid predict 50.0 %, test predict 40.0 % from the ledger "
                    "(ablation_v2/variant=quality_judge,seed=2) (3/48 trials done)")


def test_a_rescore_reads_the_ledger_for_trials_whose_models_are_elsewhere(tmp_path):
    out, where = tmp_path / "sweep", str(tmp_path / "v2.jsonl")
    out.mkdir()
    rows = [_row(f"variant={v},seed={s}", v, s) for v in ("dss", "clean_dss") for s in (0, 1)]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = load_sweep(ROOT / "sweeps" / "ablation_v2.yaml")
    with pytest.raises(ConfigError, match="no ledger records its valid1500_predict"):
        rescore_valid(spec, str(out), 1500, where)
    ledger.add_rows(where, spec, [{**r, "valid1500_predict": 0.7 + 0.01 * i} for i, r in enumerate(rows)])
    rescored = rescore_valid(spec, str(out), 1500, where)
    assert [r["valid1500_predict"] for r in rescored] == [0.7, 0.71, 0.72, 0.73]
    assert "| clean_dss | 2 |" in (out / "rescored-valid-1500.md").read_text()


def test_a_rescore_checks_the_rationales_of_trials_evaluated_before_the_checks_existed(tmp_path):
    """Trials that trained before evaluate checked rationales gain the checks from their saved explain outputs:
    results and ledger both, with no model run (the valid1500 score is already there)."""
    out, where = tmp_path / "sweep", str(tmp_path / "v2.jsonl")
    trial = "variant=dss,seed=0"
    method = out / "trials" / trial / "dss"
    (method / "eval" / "valid1500-predict").mkdir(parents=True)
    (method / "eval" / "valid-explain").mkdir(parents=True)
    (out / "trials" / trial / "config.yaml").write_text(
        trial_config(ABLATION, {"variant": "dss", "train.seed": 0}).to_yaml())
    (method / "eval" / "valid1500-predict" / "metrics.json").write_text(json.dumps({"accuracy": 0.8}))
    questions = [r["input"] for r in make_split("valid", train_size=1, eval_size=40, version=2)]
    traps = [q for q in questions if parse_v2(q)[0].trap][:2]
    plain = next(q for q in questions if not parse_v2(q)[0].trap)
    rationales = []  # a trap read right, the same trap misread, a plain wording with its numbers swapped
    for q, use_trap in ((traps[0], False), (traps[1], True), (plain, False)):
        wording, a, b = parse_v2(q)
        op = wording.trap if use_trap else wording.op
        x, y = (b, a) if q == plain else (a, b)
        rationales.append({"input": q, "rationale": f"{x} {op} {y} = {answer_v2(op, x, y)}."})
    (method / "eval" / "valid-explain" / "predictions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rationales))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(_row(trial, "dss", 0)))
        writer.writeheader()
        writer.writerow(_row(trial, "dss", 0))

    [row] = rescore_valid(ABLATION, str(out), 1500, where)
    both = 2 / 3 if parse_v2(plain)[1] != parse_v2(plain)[2] else 1.0  # swapping equal numbers changes nothing
    assert row["valid_rationale_trap_operation"] == 0.5 and row["valid_rationale_both_numbers"] == both
    assert "test_rationale_trap_operation" not in row  # no test explain outputs saved
    scores = ledger.read(where)[_hash(ABLATION, "dss")]["scores"]
    assert scores["valid_rationale_trap_operation"] == 0.5 and scores["valid1500_predict"] == 0.8
    assert "## valid rationales: trap operation" in (out / "rescored-valid-1500.md").read_text()
