import pytest

from qcrd_ray.data.answers import answer_key, is_correct, numeric_value, parse_answer
from qcrd_ray.data.tasks import NLI_LABELS, TaskSpec, get_task

CQA = ["park", "coloring book", "garden center", "math problem", "gravity"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(d) math problem", "math problem"),
        ("(D)", "math problem"),
        ("d)", "math problem"),
        ("D", "math problem"),
        ("d. math problem", "math problem"),
        ("math problem.", "math problem"),
        ("Math Problem", "math problem"),
        ("it is an example of gravity", "gravity"),
        ("either (b) coloring book or (c) garden center", None),  # a hedge is not an answer
        ("(z) nothing", None),
        ("something else", None),
        ("", None),
    ],
)
def test_cqa_choice_parsing(text, expected):
    assert parse_answer("cqa", text, CQA) == expected


def test_longest_overlapping_choice_wins():
    choices = ["store", "grocery store", "bank", "home", "park"]
    assert parse_answer("cqa", "a grocery store", choices) == "grocery store"
    assert parse_answer("cqa", "the store", choices) == "store"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("entailment", "entailment"),
        ("Contradiction.", "contradiction"),
        ("neutral", "neutral"),
        ("entail", "entailment"),
        ("yes", "entailment"),
        ("no", "contradiction"),
        ("it is not possible to tell", "neutral"),
        ("entailment or neutral", None),
        ("maybe", None),
    ],
)
@pytest.mark.parametrize("task", ["anli1", "esnli"])
def test_nli_parsing_includes_palm_words(task, text, expected):
    assert parse_answer(task, text, list(NLI_LABELS)) == expected
    assert parse_answer(task, text) == expected  # labels come from the task when a row has no choices


@pytest.mark.parametrize(
    "text, value",
    [
        ("( 84.0 / 2.0 )", 42.0),
        ("(84 / 2).", 42.0),
        ("42", 42.0),
        ("1,200", 1200.0),
        ("$ 5", 5.0),
        ("42 apples", 42.0),
        ("84 / 2 = 42", 42.0),
        ("(3 x 4)", 12.0),
        ("12 ÷ 4", 3.0),
        ("(some - 8)", None),
        ("1 / 0", None),
        ("9**9**9", None),
        ("__import__('os').system('x')", None),
        ("", None),
    ],
)
def test_numeric_values(text, value):
    assert numeric_value(text) == value


def test_numeric_parse_returns_the_answer_as_written():
    assert parse_answer("svamp", " (84 / 2). ") == "(84 / 2)"
    assert parse_answer("synthetic", "(some - 8)") is None
    assert parse_answer("svamp", None) is None


@pytest.mark.parametrize(
    "predicted, gold, correct",
    [
        ("(84 / 2)", "( 84.0 / 2.0 )", True),
        ("42", "( 84.0 / 2.0 )", True),
        ("42.00001", "( 84.0 / 2.0 )", True),  # within the relative tolerance
        ("42.1", "( 84.0 / 2.0 )", False),
        ("(10 / 3)", "3.3333333", True),
        ("1 / 0", "( 84.0 / 2.0 )", False),  # division by zero is a wrong answer, not a crash
        ("9**9**9", "( 84.0 / 2.0 )", False),
        ("__import__('os').system('x')", "1", False),
        (None, "1", False),
        ("1", None, False),
        ("0.0000001", "0", True),  # absolute tolerance near zero
    ],
)
def test_numeric_scoring(predicted, gold, correct):
    assert is_correct("svamp", predicted, gold) is correct


def test_choice_scoring():
    assert is_correct("cqa", "(d)", "math problem", CQA)
    assert is_correct("cqa", "Math problem", "math problem", CQA)
    assert not is_correct("cqa", "(e)", "math problem", CQA)
    assert not is_correct("cqa", "banana", "math problem", CQA)
    assert is_correct("esnli", "yes", "entailment", list(NLI_LABELS))
    assert not is_correct("esnli", "no", "entailment", list(NLI_LABELS))


def test_answer_keys_group_equal_answers():
    assert answer_key("svamp", "(84 / 2)") == answer_key("svamp", "42") == answer_key("svamp", "42.0000001") == "42"
    assert answer_key("svamp", "-0.0") == "0"
    assert answer_key("svamp", "(1 / 3)") == "0.333333"
    assert answer_key("svamp", "x + 1") is None
    assert answer_key("cqa", "(d) math problem", CQA) == answer_key("cqa", "Math problem", CQA) == "math problem"
    assert answer_key("esnli", "it is not possible to tell") == "neutral"


def test_user_tasks_with_and_without_choices():
    spec = get_task("mytask")
    assert spec.answer_type == "choice"
    assert is_correct(spec, "(b)", "blue", ["red", "blue"])
    assert is_correct(spec, " Paris. ", "paris")  # no choices: normalised text match
    numeric = get_task("mymath", "numeric")
    assert is_correct(numeric, "6", "2 * 3")
    assert get_task("cqa", "text") == TaskSpec("cqa", "text")
    with pytest.raises(ValueError):
        get_task("x", "bogus")


def test_negated_nli_label_is_no_answer():
    from qcrd_ray.data.answers import parse_answer

    assert parse_answer("anli1", "not entailment") is None
    assert parse_answer("esnli", "It is not a contradiction") is None
    assert parse_answer("esnli", "contradiction") == "contradiction"
