"""Testbed v2 (docs/quality.md): wording-implied operations with numeric labels, a teacher whose one mistake is a
misconception tied to the wording, several correct phrasings; the clean-DSS headroom arm. Pure: no Ray."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import torch

from qcrd_ray.config import Config, ConfigError
from qcrd_ray.data import answers, prompts
from qcrd_ray.data.synthetic import WORDINGS, answer_v2, check_rationale_v2, make_split, parse_v2
from qcrd_ray.data.tasks import get_task
from qcrd_ray.evaluate import rationale_shares, score_output
from qcrd_ray.teacher.backends.synthetic import V2_TEMPLATES, synthetic_v2_sample

V2 = {"version": 2, "max_operand": 9}


def _samples(noise, questions=2000, k=5, seed=7):
    rows = make_split("train", train_size=questions, eval_size=1, seed=seed, **V2)
    return [(row, [synthetic_v2_sample(row["input"], 1000 * i + s, 0.7, noise) for s in range(k)])
            for i, row in enumerate(rows)]


def test_deterministic_from_the_seed_disjoint_and_version_1_unchanged():
    a = make_split("train", train_size=200, eval_size=20, seed=3, **V2)
    assert a == make_split("train", train_size=200, eval_size=20, seed=3, **V2)
    assert a != make_split("train", train_size=200, eval_size=20, seed=4, **V2)
    splits = {s: {r["input"] for r in make_split(s, train_size=300, eval_size=60, **V2)}
              for s in ("train", "valid", "test")}
    assert [len(v) for v in splits.values()] == [300, 60, 60]
    train, valid, test = splits.values()
    assert not (train & valid or train & test or valid & test)
    assert make_split("test", train_size=10, eval_size=30, **V2) == \
        make_split("test", train_size=99, eval_size=30, **V2)
    # version 1 is the default and its stream does not move
    assert make_split("test", train_size=5, eval_size=30, steps=2, max_operand=9) == \
        make_split("test", train_size=5, eval_size=30, steps=2, max_operand=9, version=1)
    with pytest.raises(ValueError, match="one step"):
        make_split("test", train_size=5, eval_size=5, steps=2, version=2)
    with pytest.raises(ValueError, match="version=3"):
        make_split("test", train_size=5, eval_size=5, version=3)


def test_labels_are_the_final_number_of_the_wording_s_operation_and_every_wording_occurs():
    rows = make_split("train", train_size=2000, eval_size=10, **V2)
    used = Counter()
    for row in rows:
        wording, a, b = parse_v2(row["input"])
        used[wording.cue] += 1
        assert row["label"] == answer_v2(wording.op, a, b) and float(row["label"]).is_integer()
        assert 2 <= min(a, b) and max(a, b) <= 9 and float(row["label"]) > 0
    assert set(used) == {w.cue for w in WORDINGS} and min(used.values()) > 50
    # half the wordings are traps, each misread as one other operation
    assert sum(w.trap is not None for w in WORDINGS) == len(WORDINGS) // 2
    assert all(w.trap != w.op for w in WORDINGS if w.trap)
    with pytest.raises(ValueError, match="version-2"):
        parse_v2(make_split("test", train_size=1, eval_size=1, steps=2)[0]["input"])


def test_numeric_labels_are_scored_by_the_task_machinery_in_both_modes():
    gold = "56"
    assert score_output("synthetic", "predict", "56", gold, [])["correct"]
    assert not score_output("synthetic", "predict", "( 7.0 * 8.0 )x", gold, [])["correct"]
    out = '"times as many" means we multiply: 7 * 8 = 56. The answer is 56.'
    scored = score_output("synthetic", "explain", out, gold, [])
    assert scored["correct"] and scored["prediction"] == "56"
    assert not score_output("synthetic", "explain", "7 + 8 = 15. The answer is 15.", gold, [])["correct"]


def test_the_rationale_checks_read_the_teacher_s_misconception_and_numbers_in_every_phrasing():
    """evaluate's explain-mode diagnosis on the teacher's own samples (whose mistakes are known): on a trap wording
    a sample passes trap_operation exactly when it is not the misconception, in every phrasing; every sample
    states both numbers; other wordings have no trap check."""
    seen, check = Counter(), get_task("synthetic").check_rationale
    v2 = Config().replace(data={"synthetic_version": 2}).data
    for row, ss in _samples(0.5, questions=600):
        wording = parse_v2(row["input"])[0]
        for text, mistake in ss:
            rationale = prompts.parse_teacher_output("synthetic", text).rationale
            checks = check(v2, row["input"], rationale)
            assert check(Config().data, row["input"], rationale) is None  # version 1 has no checks
            assert checks["both_numbers"] is True
            if wording.trap is None:
                assert checks["trap_operation"] is None
            else:
                assert checks["trap_operation"] is (mistake is None)
                seen[mistake] += 1
    assert seen[None] > 500 and seen["misconception"] > 500


def test_a_student_rationale_that_names_the_operation_in_words_or_swaps_the_numbers():
    question = make_split("test", train_size=1, eval_size=400, **V2)
    trap = next(r["input"] for r in question if parse_v2(r["input"])[0].cue == "for days")  # "*" misread as "+"
    _, a, b = parse_v2(trap)
    assert check_rationale_v2(trap, f"We multiply. {a} * {b} = {a * b}.") == {"trap_operation": True,
                                                                           "both_numbers": True}
    assert check_rationale_v2(trap, f"We add: {a} + {b} = {a + b}.") == {"trap_operation": False,
                                                                      "both_numbers": True}
    # no equation: the operation it names in words, and no numbers stated
    assert check_rationale_v2(trap, '"for days" means multiplication.') == {"trap_operation": True,
                                                                            "both_numbers": False}
    assert check_rationale_v2(trap, f"{b} * {a} = {a * b}.")["both_numbers"] is (a == b)  # the order counts
    assert check_rationale_v2(trap, "") == {"trap_operation": False, "both_numbers": False}
    assert check_rationale_v2("Tom has 3 apples.\nHow many?", "3 + 4 = 7.") is None  # not a v2 question
    # shares over the questions each check applies to
    shares = rationale_shares([{"trap_operation": True, "both_numbers": False},
                               {"trap_operation": None, "both_numbers": True}, None,
                               {"trap_operation": False, "both_numbers": True}])
    assert shares == {"trap_operation": {"share": 0.5, "n": 2}, "both_numbers": {"share": 2 / 3, "n": 3}}
    assert rationale_shares([None, None]) == {}


def test_phrasings_give_distinct_correct_positives():
    per_question, templates = [], Counter()
    markers = (" means we ", " tell us to ", " because the question says ", "This is ")  # one per template
    for row, ss in _samples(0.0, questions=400):
        correct = {text for text, mistake in ss if mistake is None}
        per_question.append(len(correct))
        for text, _ in ss:
            parsed = prompts.parse_teacher_output("synthetic", text)
            assert parsed.status == "ok" and answers.is_correct("synthetic", parsed.answer, row["label"])
            templates[next(m for m in markers if m in parsed.rationale)] += 1
    # K = 5 samples over 4 phrasings: 2.7 distinct expected; every phrasing in use
    assert sum(per_question) / len(per_question) > 2.5 and len(templates) == len(V2_TEMPLATES) == len(markers)


@pytest.mark.parametrize("noise", [0.0, 0.3, 0.6])
def test_the_misconception_is_tied_to_the_wording_at_the_rate_of_the_dial(noise):
    """Only trap wordings are ever wrong, always as their one trap operation, at rate ≈ noise there (10 000 trap
    samples: the standard error is under 0.5 points; the seeds are fixed, so the bound cannot fail by chance)."""
    trap_samples, wrong_values = [], []
    for row, ss in _samples(noise):
        wording, a, b = parse_v2(row["input"])
        for text, mistake in ss:
            parsed = prompts.parse_teacher_output("synthetic", text)
            if wording.trap is None:
                assert mistake is None
                continue
            trap_samples.append(mistake is not None)
            if mistake:
                assert mistake == "misconception" and f" {a} {wording.trap} {b} = " in parsed.rationale
                assert parsed.answer == answer_v2(wording.trap, a, b)
                wrong_values.append(not answers.is_correct("synthetic", parsed.answer, row["label"]))
    assert len(trap_samples) > 4000
    assert abs(sum(trap_samples) / len(trap_samples) - noise) < 0.025
    if noise:  # a misread rarely keeps the value (2 + 2 = 2 * 2, 4 / 2 = 4 - 2)
        assert sum(wrong_values) / len(wrong_values) > 0.9


def test_misconceived_samples_of_similar_questions_agree_so_the_majority_can_be_wrong():
    wrong_majority = Counter()
    for row, ss in _samples(0.6, questions=600):
        wording = parse_v2(row["input"])[0]
        votes = Counter(prompts.parse_teacher_output("synthetic", t).answer for t, _ in ss)
        wrong_majority[wording.trap is not None] += votes.most_common(1)[0][0] != row["label"]
    # P(at least 3 of 5 misread) = 0.68 at noise 0.6 on the ~300 trap questions; never on the others
    assert wrong_majority[False] == 0 and 150 < wrong_majority[True] < 260


def test_version_2_is_a_mode_of_the_built_in_one_step_task():
    assert Config().data.synthetic_version == 1
    assert Config().replace(data={"synthetic_version": 2}).data.synthetic_version == 2
    for bad in ({"synthetic_steps": 2}, {"task": "svamp"}, {"data_dir": "datasets"}):
        with pytest.raises(ConfigError, match="synthetic_version"):
            Config().replace(data={"synthetic_version": 2, **bad})


def test_the_synthetic_backend_reads_v2_questions_and_reports_others_as_errors():
    from qcrd_ray.teacher.backends.synthetic import SyntheticBackend

    cfg = Config().replace(data={"synthetic_version": 2}, teacher={"noise": 0.3})
    row = make_split("test", train_size=1, eval_size=1, **V2)[0]
    out = SyntheticBackend(cfg).complete([{**row, "seed": 5}, {"input": "How tall is Anna?", "label": "1", "seed": 1}])
    assert out[0].text == synthetic_v2_sample(row["input"], 5, cfg.teacher.temperature, 0.3)[0] and not out[0].error
    assert not out[1].text and "version 2" in out[1].error


# ---- the headroom control (clean-DSS) and the gold rule


def _teacher_rows(rule: str, noise: float = 0.6, n: int = 60) -> list[dict]:
    from qcrd_ray.teacher.consistency import teacher_row

    rows = []
    for row, ss in _samples(noise, questions=n, seed=11):
        samples = []
        for i, (text, _) in enumerate(ss):
            parsed = prompts.parse_teacher_output("synthetic", text)
            samples.append({"index": i, "text": text, "rationale": parsed.rationale, "answer": parsed.answer,
                            "status": parsed.status})
        rows.append(teacher_row(row, samples, rule=rule))
    return rows


def test_clean_dss_learns_the_first_gold_consistent_rationale_only():
    from qcrd_ray.qcrd.targets import candidate_targets, one_rationale

    dss = Config().replace(train={"method": "dss"})
    clean = dss.replace(loss={"dss_rationale": "gold"})
    rows = _teacher_rows("majority")
    first_wrong = [r for r in rows if r["samples"][0]["answer"] != r["label"]]
    assert first_wrong  # at noise 0.6 some questions' first sample is a misconception
    for row in rows:
        (dss_target,), _ = candidate_targets(row, dss)
        clean_targets, negatives = candidate_targets(row, clean)
        assert negatives == []
        if row in first_wrong:
            assert dss_target.endswith(f"The answer is {row['samples'][0]['answer']}.")
        for target in clean_targets:  # the first correct sample, with the gold answer
            good = next(s for s in row["samples"] if s["answer"] == row["label"])
            assert target == prompts.explain_target(good["rationale"], good["answer"])
        if not any(s["answer"] == row["label"] for s in row["samples"]):
            assert clean_targets == []  # no clean rationale: the label task alone
    with pytest.raises(ValueError, match="dss_rationale"):
        one_rationale(rows[0], "best")


def _initial_student_hashes(cfg: Config, rows: list[dict]) -> tuple[str, str]:
    """What training starts from (train/trainer.py's _init_student): the tokenizer trained on the teacher rows'
    texts and the tiny student initialised under torch.manual_seed(train.seed)."""
    from qcrd_ray.qcrd.targets import tokenizer_texts
    from qcrd_ray.students import load_student

    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_student(cfg.student, tokenizer_texts(rows))
    tok_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return tok_hash, weights.hexdigest()


def test_neither_the_gold_rule_nor_clean_dss_changes_the_tokenizer_or_the_initial_weights():
    """H = clean-DSS − DSS must measure the rationales alone: with the same seed, the gold positive rule (the
    issue's combination) and loss.dss_rationale gold (the study's arm) start from the same tokenizer and weights."""
    base = Config().replace(data={"synthetic_version": 2}, student={"max_target_len": 64}, train={"method": "dss"})
    majority_rows, gold_rows = _teacher_rows("majority"), _teacher_rows("gold")
    assert [r["positives"] for r in majority_rows] != [r["positives"] for r in gold_rows]  # the rule does split
    reference = _initial_student_hashes(base, majority_rows)
    assert _initial_student_hashes(base.replace(self_consistency={"positive_rule": "gold"}), gold_rows) == reference
    assert _initial_student_hashes(base.replace(loss={"dss_rationale": "gold"}), majority_rows) == reference
    assert _initial_student_hashes(base.replace(train={"seed": 1}), majority_rows)[1] != reference[1]
