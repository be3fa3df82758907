import re

import pytest

from qcrd_ray.data.answers import numeric_value
from qcrd_ray.data.synthetic import equation, make_split

SVAMP_LABEL = re.compile(r"^\( (\d+\.0) ([-+*/]) (\d+\.0) \)$")


def test_deterministic_from_the_seed():
    a = make_split("train", train_size=50, eval_size=10, seed=3)
    assert a == make_split("train", train_size=50, eval_size=10, seed=3)
    assert a != make_split("train", train_size=50, eval_size=10, seed=4)


def test_split_sizes_and_disjoint_splits():
    splits = {s: make_split(s, train_size=300, eval_size=60) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [300, 60, 60]
    inputs = [{r["input"] for r in rows} for rows in splits.values()]
    assert sum(map(len, inputs)) == len(set().union(*inputs)) == 420


def test_eval_splits_do_not_depend_on_the_train_size():
    assert make_split("test", train_size=10, eval_size=20) == make_split("test", train_size=999, eval_size=20)


def test_labels_are_svamp_equations_with_whole_positive_answers():
    rows = make_split("train", train_size=400, eval_size=1)
    operators = set()
    for row in rows:
        match = SVAMP_LABEL.match(row["label"])
        assert match, row["label"]
        a, op, b = float(match.group(1)), match.group(2), float(match.group(3))
        operators.add(op)
        value = numeric_value(row["label"])
        assert value == int(value) and value > 0
        assert str(int(a)) in row["input"] and str(int(b)) in row["input"]
        assert row["task"] == "synthetic" and row["choices"] == [] and row["rationales"] == []
    assert operators == {"+", "-", "*", "/"}


def test_equation_format():
    assert equation(5, "+", 3) == "( 5.0 + 3.0 )"


def test_large_sizes_and_bad_arguments():
    assert len(make_split("train", train_size=20_000, eval_size=10)) == 20_000
    with pytest.raises(ValueError, match="split"):
        make_split("dev", train_size=1, eval_size=1)
    with pytest.raises(ValueError, match="at most"):
        make_split("train", train_size=10**6, eval_size=1)


# ---- the quality testbed: several steps per problem, a noise dial on the teacher

def test_two_step_problems_need_both_steps():
    rows = make_split("train", train_size=500, eval_size=10, steps=2)
    shapes = set()
    for row in rows:
        match = re.match(r"^\( \( (\d+\.0) ([-+*/]) (\d+\.0) \) ([-+*/]) (\d+\.0) \)$", row["label"])
        assert match, row["label"]
        shapes.add(match.group(4))
        value = numeric_value(row["label"])
        assert value == int(value) and value > 0  # every intermediate and final answer is a whole count
        assert all(str(int(float(match.group(g)))) in row["input"] for g in (1, 3, 5))
    assert shapes == {"+", "-", "*", "/"}
    assert len({r["input"] for r in rows}) == 500


def test_one_step_stream_is_unchanged_by_the_steps_option():
    assert make_split("test", train_size=5, eval_size=30) == make_split("test", train_size=5, eval_size=30, steps=1)
    with pytest.raises(ValueError, match="at least one step"):
        make_split("test", train_size=5, eval_size=5, steps=0)


def test_max_operand_bounds_every_stated_number_and_leaves_the_default_stream_alone():
    rows = make_split("train", train_size=500, eval_size=10, steps=2, max_operand=9)
    shapes, values = set(), set()
    for row in rows:
        match = re.match(r"^\( \( (\d+)\.0 ([-+*/]) (\d+)\.0 \) ([-+*/]) (\d+)\.0 \)$", row["label"])
        assert match, row["label"]
        assert all(2 <= int(match.group(g)) <= 9 for g in (1, 3, 5))
        assert all(int(n) <= 9 for n in re.findall(r"\d+", row["input"]))
        shapes |= {match.group(2), match.group(4)}
        value = numeric_value(row["label"])
        assert value == int(value) and value > 0
        values.add(value)
    assert shapes == {"+", "-", "*", "/"} and max(values) > 9  # intermediate values and answers are not bounded
    assert len({r["input"] for r in rows}) == 500
    assert make_split("test", train_size=5, eval_size=30, steps=2, max_operand=None) == \
        make_split("test", train_size=5, eval_size=30, steps=2)
    assert make_split("test", train_size=5, eval_size=30, steps=2, max_operand=4)  # the smallest bound works
    with pytest.raises(ValueError, match="max_operand=3"):
        make_split("test", train_size=5, eval_size=5, max_operand=3)


def _samples(noise, steps, questions=1000, k=10):
    from qcrd_ray.teacher.backends.synthetic import synthetic_sample

    rows = make_split("train", train_size=questions, eval_size=1, steps=steps, seed=7)
    return [(row, [synthetic_sample(row["label"], 1000 * i + s, 0.7, row["id"], noise) for s in range(k)])
            for i, row in enumerate(rows)]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3, 0.6])
def test_measured_mistake_rate_matches_the_dial(noise, steps):
    # 10 000 samples: the standard error of the rate is under 0.6 points (plus some clustering by question), so
    # 2.5 points is a real margin; the seeds are fixed, so the test cannot fail by chance
    samples = [m for _, ss in _samples(noise, steps) for _, m in ss]
    assert abs(sum(m is not None for m in samples) / len(samples) - noise) < 0.025
    if noise:
        assert set(samples) == {None, "operator", "arithmetic", "malformed"}


def test_mistakes_change_the_answer_and_hard_questions_mislead_the_majority():
    from collections import Counter

    from qcrd_ray.data.answers import numeric_value as value_of
    from qcrd_ray.teacher.backends.synthetic import mistake_rates

    ordinary_p, hard_p = mistake_rates(0.45, 0.7)
    assert hard_p == 0.9 and abs(0.8 * ordinary_p + 0.2 * hard_p - 0.45) < 1e-12
    wrong_majority = []
    for row, ss in _samples(0.45, 2, questions=400, k=9):
        answers = []
        for text, mistake in ss:
            answer = text.split("<Answer>: ")[1] if "<Answer>: " in text else None
            if mistake is None:
                assert value_of(answer) == value_of(row["label"]) and "Step by step" in text
            elif mistake != "malformed":
                assert answer.strip() != row["label"][2:-2]
            answers.append(answer)
        top, _ = Counter(a for a in answers if a).most_common(1)[0]
        wrong_majority.append(top != row["label"][2:-2])
    # about a fifth of the questions are hard, and on most of them one shared wrong operator wins the vote
    assert 0.1 < sum(wrong_majority) / len(wrong_majority) < 0.3


def test_a_label_that_is_not_fully_bracketed_is_reasoned_in_one_line():
    from qcrd_ray.teacher.backends.synthetic import synthetic_sample

    text, mistake = synthetic_sample("( 5.0 + 3.0 ) * 2.0", 1, 0.0, "q", noise=0.0)
    assert mistake is None and text.endswith("<Answer>: ( 5.0 + 3.0 ) * 2.0") and "= 16" in text


def test_a_slip_that_makes_a_later_divisor_zero_stops_the_rationale_there():
    """The inner step's arithmetic slip (3 - 2 = 0) leaves 6 / 0: the teacher stops, as a truncated generation
    does, instead of the sample failing as a label it "cannot read"."""
    from qcrd_ray.teacher.backends.synthetic import synthetic_sample

    text, mistake = synthetic_sample("( 6.0 / ( 3.0 - 2.0 ) )", 0, 0.7, "q", noise=1.0)
    assert (text, mistake) == ("<Explanation>: Step by step: 3 - 2 = 0. So the answer", "malformed")
