import pytest

from qcrd_ray.data.prompts import (
    ANSWER_TAG,
    EXPLANATION_TAG,
    ParsedRationale,
    explain_target,
    parse_recorded_cot,
    parse_teacher_output,
    split_explanation,
    student_input,
    teacher_prompt,
)
from qcrd_ray.data.tasks import NLI_LABELS

CQA = ["park", "coloring book", "garden center", "math problem", "gravity"]


def test_student_prefixes():
    assert student_input("predict", "Q") == "predict: Q"
    assert student_input("explain", "Q") == "explain: Q"
    with pytest.raises(ValueError):
        student_input("answer", "Q")


@pytest.mark.parametrize(
    "rationale, answer",
    [("5 + 3 = 8.", "( 5.0 + 3.0 )"), ("It is 3.5 km. So 3.5 it is.", "3.5"), ("", "entailment"),
     ("Only (d) fits; the answer is not (a).", "math problem")],
)
def test_split_explanation_inverts_explain_target(rationale, answer):
    target = explain_target(rationale, answer)
    assert target.endswith(f"The answer is {answer}.")
    assert split_explanation(target) == (rationale, answer)


def test_split_explanation_of_student_output_without_answer():
    assert split_explanation("I think it is 8") == ("I think it is 8", None)
    assert split_explanation("Because. The answer is") == ("Because.", None)
    assert split_explanation("r. The answer is 8. And more text") == ("r.", "8")


@pytest.mark.parametrize(
    "task, row",
    [
        ("svamp", {"input": "Tom has 5 apples. He buys 3 more.\nHow many apples?", "choices": []}),
        ("cqa", {"input": "Where?\nAnswer Choices:\n(a) park\n(b) home", "choices": ["park", "home"]}),
        ("esnli", {"input": "premise: A dog runs. hypothesis: An animal moves.", "choices": list(NLI_LABELS)}),
        ("mytask", {"input": "Capital of France?", "choices": []}),
    ],
)
def test_teacher_prompt_asks_for_the_paper_format(task, row):
    prompt = teacher_prompt(task, row)
    assert row["input"] in prompt
    assert prompt.rstrip().endswith(EXPLANATION_TAG)
    assert prompt.count(ANSWER_TAG) >= 2  # format instruction and the worked example


def test_teacher_prompt_words_per_task_kind():
    assert "entailment, neutral or contradiction" in teacher_prompt("anli1", {"input": "p", "choices": list(NLI_LABELS)})
    assert "equation" in teacher_prompt("synthetic", {"input": "q"})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<Explanation>: He buys 3 more, 5 + 3 = 8.\n<Answer>: ( 5 + 3 )",
         ParsedRationale("He buys 3 more, 5 + 3 = 8.", "( 5 + 3 )", "ok")),
        (" He buys 3 more.\n<Answer>: 8.\n\nQuestion: next exemplar\n<Explanation>: ...",
         ParsedRationale("He buys 3 more.", "8", "ok")),  # prompt ended with the explanation tag; tail ignored
        ("<Explanation>: Something.\n<Answer>: some apples", ParsedRationale("Something.", None, "no_answer")),
        ("<Explanation>: No tag here. The answer is 8.", ParsedRationale("No tag here.", "8", "ok")),
        ("<Explanation>: I am not sure.", ParsedRationale("I am not sure.", None, "no_answer")),
        ("   ", ParsedRationale("", None, "empty")),
        (None, ParsedRationale("", None, "empty")),
    ],
)
def test_parse_teacher_output_numeric(text, expected):
    assert parse_teacher_output("svamp", text) == expected


def test_parse_teacher_output_choices():
    parsed = parse_teacher_output("cqa", "<Explanation>: Math.\n<Answer>: (d) math problem", CQA)
    assert parsed == ParsedRationale("Math.", "math problem", "ok")
    nli = parse_teacher_output("anli1", "<Explanation>: Same thing.\n<Answer>: Entailment", list(NLI_LABELS))
    assert nli.answer == "entailment"


# real strings from the DSS release (shortened), one per style
SVAMP_COT = ("Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42. The answer is "
             "(84 / 2).\n\nQ: There are 120 students in the school. 1/3 of them are boys. How many students are boys?"
             "\nA: There are 120 students. The answer is (120 /")
CQA_COT = ("The answer must be a place where a bum would live. Of the above choices, only a train station is a place "
           "where a bum would live. So the answer is (c) train station.\n\nQ: What is the name of the famous painting"
           "?\nAnswer Choices:\n(a) Mona Lisa\n(b) The Scream\nA: So the answer is (a) Mona Lisa.")
ANLI_COT = ("The premise mentions that Hansberry passed away on November 3, 1965. The answer is 71. So the answer is "
            "entailment.\n\nPremise: The 2016–17 season was the 117th season.\nHypothesis: x\nAnswer: contradiction")
ESNLI_COT = ("The person could be training his horse for a competition, but it is not necessarily the case.\n"
             "Answer: neutral\n\nPremise: A person on a")


@pytest.mark.parametrize(
    "task, text, choices, expected",
    [
        ("svamp", SVAMP_COT, [], ParsedRationale(
            "Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42.", "(84 / 2)", "ok")),
        ("cqa", CQA_COT, ["bus depot", "beach", "train station", "bridge", "bridge"], ParsedRationale(
            "The answer must be a place where a bum would live. Of the above choices, only a train station is a "
            "place where a bum would live.", "train station", "ok")),
        ("anli1", ANLI_COT, list(NLI_LABELS), ParsedRationale(
            "The premise mentions that Hansberry passed away on November 3, 1965. The answer is 71.", "entailment",
            "ok")),
        ("esnli", ESNLI_COT, list(NLI_LABELS), ParsedRationale(
            "The person could be training his horse for a competition, but it is not necessarily the case.",
            "neutral", "ok")),
        ("esnli", "It is a woman.\nAnswer:\n\nPremise: x", list(NLI_LABELS),
         ParsedRationale("It is a woman.", None, "no_answer")),
        ("svamp", "So 2 * x = 12. The answer is (2 * x).", [], ParsedRationale("So 2 * x = 12.", None, "no_answer")),
        ("cqa", "Only repair and fix. So the answer is either (b) park or (c) gravity.", CQA,
         ParsedRationale("Only repair and fix.", None, "no_answer")),
        ("svamp", "\n\nQ: only the next exemplar", [], ParsedRationale("", None, "empty")),
    ],
)
def test_parse_recorded_cot_styles(task, text, choices, expected):
    assert parse_recorded_cot(task, text, choices) == expected


def test_recorded_cot_round_trips_into_a_student_target():
    parsed = parse_recorded_cot("svamp", SVAMP_COT)
    rationale, answer = split_explanation(explain_target(parsed.rationale, parsed.answer))
    assert (rationale, answer) == (parsed.rationale, parsed.answer)
    assert "\n\nQ:" not in rationale
