"""Student inputs and targets, teacher prompts, and parsing of teacher outputs (pure functions).

The student is one seq2seq model with two tasks chosen by a prefix: ``predict: <input>`` -> label and
``explain: <input>`` -> ``<rationale> The answer is <answer>.``. Teachers are prompted in the paper's
``<Explanation>: ... <Answer>: ...`` format; the recorded PaLM CoT strings of the DSS release use
``... So the answer is X.`` (svamp, cqa, anli1) or ``...\\nAnswer: X`` (esnli), followed by the start of the next
few-shot exemplar, which is cut at the first blank line.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Sequence

from qcrd_ray.data.answers import parse_answer
from qcrd_ray.data.tasks import TaskSpec, as_task

PREDICT = "predict: "
EXPLAIN = "explain: "
MODES = {"predict": PREDICT, "explain": EXPLAIN}

EXPLANATION_TAG = "<Explanation>:"
ANSWER_TAG = "<Answer>:"


class ParsedRationale(NamedTuple):
    rationale: str
    answer: str | None  # parsed answer (the choice text; a numeric answer as written), None if none
    status: str  # ok | no_answer | empty


def student_input(mode: str, text: str) -> str:
    """``predict: <text>`` or ``explain: <text>``."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    return MODES[mode] + text


def explain_target(rationale: str, answer: str) -> str:
    """The explain-task target: ``<rationale> The answer is <answer>.``"""
    rationale = rationale.strip()
    return f"{rationale} The answer is {answer}." if rationale else f"The answer is {answer}."


_ANSWER_IS = re.compile(r"(?:\bso,?\s+)?\bthe answer is\b:?", re.I)
_SPAN_END = re.compile(r"\.\s|\n|$")  # a sentence end ("3.5" is not one)


def _answer_span(text: str) -> str:
    text = text.strip()
    return text[: _SPAN_END.search(text).start()].strip().rstrip(".").strip()


def split_explanation(text: str) -> tuple[str, str | None]:
    """Inverse of :func:`explain_target` for generated text: ``(rationale, answer text or None)``. Uses the last
    ``The answer is``, so a rationale may itself mention an intermediate answer."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return text.strip(), None
    last = matches[-1]
    answer = _answer_span(text[last.end():])
    return text[: last.start()].strip(), answer or None


# --------------------------------------------------------------------------------------------------------------
# teacher prompts (few-shot, short: one worked example per task kind)

_INSTRUCTIONS = {
    "numeric": "Solve the math word problem. Explain your reasoning step by step, then give the answer as an "
    "arithmetic equation over the numbers in the question.",
    "choice": "Answer the multiple-choice question. Explain your reasoning step by step, then give the answer "
    "as the letter and text of one choice.",
    "nli": "Decide whether the premise entails the hypothesis, contradicts it, or neither. Explain your "
    "reasoning step by step, then answer entailment, neutral or contradiction.",
    "text": "Answer the question. Explain your reasoning step by step, then give a short answer.",
}

_EXAMPLES = {
    "numeric": (
        "Tom has 5 apples. He buys 3 more.\nHow many apples does he have now?",
        "Tom starts with 5 apples and buys 3 more, so he has 5 + 3 = 8 apples.",
        "( 5 + 3 )",
    ),
    "choice": (
        "Where would you put a plate after washing it?\nAnswer Choices: (a) table (b) cupboard (c) oven "
        "(d) floor (e) sink",
        "Clean plates are stored until they are needed again, and plates are stored in a cupboard.",
        "(b) cupboard",
    ),
    "nli": (
        "premise: A man is playing a guitar on stage. hypothesis: A man is performing music.",
        "Playing a guitar on stage is a way of performing music.",
        "entailment",
    ),
    "text": (
        "What is the capital of France?",
        "France's government sits in Paris, which makes Paris its capital.",
        "Paris",
    ),
}


def _kind(spec: TaskSpec, choices: Sequence[str]) -> str:
    kind = spec.prompt or spec.answer_type  # the task's own worked example (NLI), else its answer type's
    return "text" if kind == "choice" and not choices else kind


def teacher_prompt(task: str | TaskSpec, row: Mapping) -> str:
    """A short few-shot prompt asking for ``<Explanation>: ... <Answer>: ...``; it ends with the explanation
    tag so completion models continue from it (chat models that repeat the tag are parsed the same way)."""
    kind = _kind(as_task(task), row.get("choices") or ())
    question, explanation, answer = _EXAMPLES[kind]
    return (
        f"{_INSTRUCTIONS[kind]} Use exactly this format:\n{EXPLANATION_TAG} <your reasoning>\n"
        f"{ANSWER_TAG} <your answer>\n\n"
        f"Question: {question}\n{EXPLANATION_TAG} {explanation}\n{ANSWER_TAG} {answer}\n\n"
        f"Question: {row['input']}\n{EXPLANATION_TAG}"
    )


def _parsed(spec: TaskSpec, rationale: str, answer_text: str | None, choices: Sequence[str]) -> ParsedRationale:
    rationale = rationale.strip()
    answer = parse_answer(spec, answer_text, choices) if answer_text else None
    if not rationale and answer is None:
        return ParsedRationale("", None, "empty")
    return ParsedRationale(rationale, answer, "ok" if answer is not None else "no_answer")


def parse_teacher_output(task: str | TaskSpec, text: str | None, choices: Sequence[str] = ()) -> ParsedRationale:
    """Split a teacher completion into rationale and parsed answer. Without an ``<Answer>:`` tag, a final
    ``The answer is X`` is accepted; anything after the answer line (a continued few-shot exemplar) is ignored."""
    spec = as_task(task)
    text = (text or "").strip()
    if not text:
        return ParsedRationale("", None, "empty")
    head, tag, tail = text.partition(ANSWER_TAG)
    if tag:
        explanation = head.split(EXPLANATION_TAG)[-1]
        answer_line = tail.strip().split("\n")[0]
        return _parsed(spec, explanation, answer_line.strip().rstrip(".").strip() or None, choices)
    body = text.split(EXPLANATION_TAG)[-1].split("\n\n")[0]
    rationale, answer = split_explanation(body)
    return _parsed(spec, rationale, answer, choices)


_ESNLI_ANSWER = re.compile(r"\n\s*Answer:\s*", re.I)


def parse_recorded_cot(task: str | TaskSpec, text: str | None, choices: Sequence[str] = ()) -> ParsedRationale:
    """Parse a recorded PaLM CoT string: cut the next few-shot exemplar (everything from the first blank line:
    ``\\n\\nQ:``, ``\\n\\nPremise:``), then take the answer from ``So the answer is X.`` or ``\\nAnswer: X``."""
    spec = as_task(task)
    text = re.split(r"\n[ \t]*\n", text or "")[0].strip()
    if not text:
        return ParsedRationale("", None, "empty")
    match = _ESNLI_ANSWER.search(text)
    if match:
        return _parsed(spec, text[: match.start()], _answer_span(text[match.end():]) or None, choices)
    rationale, answer = split_explanation(text)
    return _parsed(spec, rationale, answer, choices)
