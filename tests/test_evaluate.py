"""Evaluation: scoring of predict/explain outputs (pure) and `qcrd eval` end to end on a saved student."""

from __future__ import annotations

import json

import pytest

from qcrd_ray.cli import main
from qcrd_ray.config import from_dict
from qcrd_ray.data.synthetic import check_rationale_v2, make_split, parse_v2
from qcrd_ray.evaluate import evaluate, evaluate_once, recheck_rationales, score_output
from qcrd_ray.students import load_student, save_student


def test_predict_output_is_the_answer():
    assert score_output("synthetic", "predict", "( 84.0 / 2.0 )", "( 84.0 / 2.0 )", [])["correct"]
    assert score_output("synthetic", "predict", "42", "( 84.0 / 2.0 )", [])["correct"]  # same value
    wrong = score_output("synthetic", "predict", "( 84.0 + 2.0 )", "( 84.0 / 2.0 )", [])
    assert not wrong["correct"] and wrong["rationale"] == ""


def test_explain_output_is_scored_on_the_answer_after_its_rationale():
    out = score_output("synthetic", "explain", "She shares 84 by 2. The answer is ( 84.0 / 2.0 ).", "42", [])
    assert out == {"prediction": "( 84.0 / 2.0 )", "rationale": "She shares 84 by 2.", "correct": True}
    no_answer = score_output("synthetic", "explain", "She shares 84 by 2.", "42", [])
    assert no_answer["prediction"] is None and not no_answer["correct"]


def test_choice_task_scores_the_choice_text():
    choices = ["bank", "library", "park", "zoo", "school"]
    assert score_output("cqa", "explain", "Books are lent there. The answer is (b) library.", "library",
                        choices)["correct"]


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    cfg = from_dict({"student": {"tiny_d_model": 16, "tiny_d_ff": 32, "tiny_layers": 1, "tiny_heads": 2,
                                 "tiny_vocab_size": 120, "max_target_len": 16},
                     "data": {"synthetic_eval_size": 12}})
    rows = make_split("test", train_size=10, eval_size=12)
    model, tok = load_student(cfg.student, [r["input"] for r in rows] + [r["label"] for r in rows])
    run = tmp_path_factory.mktemp("run")
    save_student(model, tok, run / "model")
    return cfg, run


@pytest.mark.parametrize("mode", ["predict", "explain"])
def test_evaluate_writes_one_prediction_per_example_and_consistent_metrics(saved_student, tmp_path, mode):
    cfg, run = saved_student
    metrics = evaluate(run, cfg, "test", mode=mode, out_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] == len(records) == 12 and metrics["mode"] == mode
    assert metrics["correct"] == sum(r["correct"] for r in records)
    assert metrics["accuracy"] == pytest.approx(metrics["correct"] / 12)
    assert {"input", "gold", "prediction", "rationale", "correct", "output"} <= set(records[0])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert "rationale_checks" not in metrics  # version 1's questions have no checks


def test_explain_on_testbed_v2_checks_each_rationale_and_counts_the_questions_each_check_applies_to(
        saved_student, tmp_path):
    cfg, run = saved_student
    v2 = cfg.replace(data={"synthetic_version": 2})
    metrics = evaluate(run, v2, "test", mode="explain", out_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(r["checks"] == check_rationale_v2(r["input"], r["rationale"]) for r in records)
    traps = sum(parse_v2(r["input"])[0].trap is not None for r in records)
    checks = metrics["rationale_checks"]
    assert 0 < traps < 12 and checks["trap_operation"]["n"] == traps and checks["both_numbers"]["n"] == 12
    assert checks["both_numbers"]["share"] == sum(r["checks"]["both_numbers"] for r in records) / 12
    # what `qcrd sweep --rescore-valid` reads for an evaluation written before the checks: the same shares
    assert recheck_rationales(v2, tmp_path) == checks
    assert "rationale_checks" not in evaluate(run, v2, "test", mode="predict")


def test_the_run_report_tabulates_each_method_s_rationale_checks_when_its_task_has_them():
    from qcrd_ray.report import rationale_table

    checked = {"rationale_checks": {"trap_operation": {"share": 0.4375, "n": 16},
                                    "both_numbers": {"share": 0.6, "n": 30}}}
    results = {"dss": {"eval": {"predict": {"accuracy": 0.5}, "explain": checked}},
               "finetune": {"eval": {"predict": {"accuracy": 0.3}}}}
    assert rationale_table(results)[2:] == ["| method | trap operation | both numbers |", "|---|---|---|",
                                            "| dss | 43.75 (16) | 60.00 (30) |"]
    assert rationale_table({"dss": {"eval": {"explain": {"accuracy": 0.5}}}}) == []


def test_evaluate_once_keeps_a_finished_evaluation(saved_student, tmp_path):
    """What `qcrd run`, a sweep and --rescore-valid call: metrics.json (written last) means done."""
    cfg, run = saved_student
    first = evaluate_once(run, cfg, "test", "predict", tmp_path)
    written = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert evaluate_once(run, cfg, "test", "predict", tmp_path) == first
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == written


def test_cli_eval_json_on_a_run_directory(saved_student, capsys):
    cfg, run = saved_student
    code = main(["eval", "--model", str(run), "--task", "synthetic", "--split", "test", "--json",
                 "--set", "data.synthetic_eval_size=12", "--set", "student.max_target_len=16"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["task"], out["split"], out["mode"], out["n"]) == ("synthetic", "test", "predict", 12)
    assert 0.0 <= out["accuracy"] <= 1.0
    assert (run / "eval" / "test-predict" / "predictions.jsonl").is_file()


def test_cli_eval_rejects_a_missing_model_with_a_clear_message(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--split", "test"]) == 2
    assert "no model found" in capsys.readouterr().err


def test_evaluate_reads_the_model_from_a_bucket_and_writes_its_outputs_there(saved_student, s3_server):
    from qcrd_ray import storage

    cfg, run = saved_student
    model_uri, out = f"{s3_server}/eval-test/model", f"{s3_server}/eval-test/out"
    storage.upload_dir(run / "model", model_uri)
    metrics = evaluate(model_uri, cfg, "test", mode="predict", out_dir=out)
    assert metrics == evaluate(run, cfg, "test", mode="predict") | {"model": model_uri}  # the same student
    assert json.loads(storage.read_text(f"{out}/metrics.json")) == metrics
    assert len(storage.read_text(f"{out}/predictions.jsonl").splitlines()) == 12
