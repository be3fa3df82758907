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
