"""Parsing and scoring answers, per task kind (pure functions; see docs/design.md, "Pure functions").

- numeric (svamp, synthetic): an answer is an equation or a number, compared by value (``safe_eval``).
- choice (cqa, NLI, user tasks with choices): a choice letter ``(c)`` / ``c)`` / ``C`` or the choice's words;
  for NLI also the PaLM CoT words yes / no / it is not possible to tell. An answer naming two different choices
  (``either (b) repair or (c) fix``) is a hedge and parses to None.
- text: normalised exact match.
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence

from qcrd_ray.data.arith import ArithError, safe_eval
from qcrd_ray.data.tasks import TaskSpec, as_task

REL_TOL = 1e-4
ABS_TOL = 1e-6

# PaLM CoT's NLI answers (e-SNLI/ANLI few-shot prompts ask "yes / no / it is not possible to tell").
_NLI_WORDS = [
    (re.compile(r"\bnot possible to tell\b|\bcannot tell\b|\bcan't tell\b|\bimpossible to tell\b"), "neutral"),
    (re.compile(r"\bentail\w*"), "entailment"),
    (re.compile(r"\bcontradict\w*"), "contradiction"),
    (re.compile(r"\bneutral\b"), "neutral"),
    (re.compile(r"^\W*yes\b"), "entailment"),
    (re.compile(r"^\W*no\b"), "contradiction"),
]
# "not entailment" names a label only to deny it: no answer rather than the label it mentions.
_NLI_NEGATED = re.compile(r"\b(?:not|no|isn't|is not)\s+(?:an?\s+)?(?:entail\w*|contradict\w*|neutral)\b")
_LETTER_IN_PARENS = re.compile(r"\(\s*([a-zA-Z])\s*\)")
_LONE_LETTER = re.compile(r"^\s*\(?([a-zA-Z])\s*[).:]?\s*(.*)$", re.S)
_NUMBER_WITH_UNIT = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*[A-Za-z][A-Za-z ]*$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_TIMES = re.compile(r"(?<=[\d)\s])[x×](?=[\s\d(])")


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().strip(string.punctuation + " ").split())


def _clean_span(text: str) -> str:
    return text.strip().rstrip(".").strip()


def numeric_value(answer: str | None) -> float | None:
    """The value of a numeric answer: an equation (``(84 / 2)``, ``84 / 2 = 42``: the left side), a number
    (``1,200``, ``$ 5``, ``42 apples``). None when it is not one, divides by zero or is out of range."""
    if answer is None:
        return None
    text = _clean_span(str(answer)).replace("$", "").replace("÷", "/")
    text = _TIMES.sub("*", _THOUSANDS.sub("", text))
    text = text.split("=")[0]
    try:
        return safe_eval(text)
    except ArithError:
        pass
    match = _NUMBER_WITH_UNIT.match(text)
    return float(match.group(1)) if match else None


def _choice_list(spec: TaskSpec, choices: Sequence[str]) -> list[str]:
    return list(choices) if choices else list(spec.labels)


def _parse_nli(text: str) -> str | None:
    low = text.lower()
    if _NLI_NEGATED.search(low):
        return None
    found = {label for pattern, label in _NLI_WORDS if pattern.search(low)}
    return found.pop() if len(found) == 1 else None


def _parse_choice(text: str, choices: list[str]) -> str | None:
    if not choices:
        return _clean_span(text) or None
    letters = {m.group(1).lower() for m in _LETTER_IN_PARENS.finditer(text)}
    letters = {c for c in letters if ord(c) - ord("a") < len(choices)}
    if len(letters) == 1:
        return choices[ord(letters.pop()) - ord("a")]
    if len(letters) > 1:
        return None
    norm = _norm(text)
    by_norm = {_norm(c): c for c in choices}
    if norm in by_norm:
        return by_norm[norm]
    lone = _LONE_LETTER.match(text)  # "c)", "C", "c. math problem"
    if lone and (not lone.group(2) or _norm(lone.group(2)) in by_norm):
        idx = ord(lone.group(1).lower()) - ord("a")
        if 0 <= idx < len(choices) and (len(text.strip()) <= 3 or _norm(lone.group(2)) == _norm(choices[idx])):
            return choices[idx]
    # the choice words somewhere in the span; keep the longest of overlapping matches ("grocery store" > "store")
    hits = {c for c in by_norm if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", norm)}
    hits = {h for h in hits if not any(h != o and h in o for o in hits)}
    return by_norm[hits.pop()] if len(hits) == 1 else None


def parse_answer(task: str | TaskSpec, text: str | None, choices: Sequence[str] = ()) -> str | None:
    """The answer in a free-text answer span, or None. Choices come back as the choice text; numeric answers
    come back as written (an equation or number) when they evaluate."""
    if text is None or not text.strip():
        return None
    spec = as_task(task)
    if spec.answer_type == "numeric":
        span = _clean_span(text)
        return span if numeric_value(span) is not None else None
    if spec.answer_type == "choice":
        options = _choice_list(spec, choices)
        if spec.is_nli and (not choices or [_norm(c) for c in choices] == list(spec.labels)):
            return _parse_nli(text)
        return _parse_choice(text, options)
    return _norm(text) or None


def answer_key(task: str | TaskSpec, answer: str | None, choices: Sequence[str] = ()) -> str | None:
    """A canonical key for grouping equal answers (self-consistency): the value rounded to 1e-6 for numeric
    tasks, the lower-cased choice or text otherwise. None for an unparseable answer."""
    if answer is None:
        return None
    spec = as_task(task)
    if spec.answer_type == "numeric":
        value = numeric_value(answer)
        if value is None:
            return None
        key = f"{round(value, 6):.6f}".rstrip("0").rstrip(".")
        return "0" if key == "-0" else key
    parsed = parse_answer(spec, answer, choices)
    return _norm(parsed) if parsed is not None else None


def is_correct(task: str | TaskSpec, predicted: str | None, gold: str | None, choices: Sequence[str] = ()) -> bool:
    """Whether a parsed answer matches the gold label. Never raises: anything unparseable is wrong."""
    if predicted is None or gold is None:
        return False
    spec = as_task(task)
    if spec.answer_type == "numeric":
        p, g = numeric_value(predicted), numeric_value(gold)
        return p is not None and g is not None and math.isclose(p, g, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    p, g = answer_key(spec, predicted, choices), answer_key(spec, gold, choices)
    return p is not None and p == g
