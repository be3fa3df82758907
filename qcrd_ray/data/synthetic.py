"""The built-in task: SVAMP-style arithmetic word problems, generated from a seed (no download).

Each problem is one template over + - * / with small operands; the gold label is an SVAMP-style equation
``( 5.0 + 3.0 )`` (the rule-based synthetic teacher parses operands and operator back out of it). Answers are
positive integers: subtraction keeps the larger operand first and division is exact, so a tiny T5 learns the task
in minutes. With ``steps`` > 1 each further step applies one more operation to the previous result
(``( ( 5.0 + 3.0 ) * 2.0 )``, "Then she shares them among 2 friends."), so a rationale's intermediate values
carry what the one-line label does not; ``steps=1`` draws exactly the single-step stream. ``max_operand`` bounds
every number the problem states (a from-scratch student copies single digits far sooner than two-digit numbers,
docs/quality.md); intermediate values and answers are not bounded.

Splits come from one stream of distinct problems drawn from ``random.Random(seed)``: the first ``eval_size`` are
``test``, the next ``eval_size`` are ``valid``, the next ``train_size`` are ``train``. The splits are disjoint,
and test/valid do not change when only the train size does.

``version=2`` (testbed v2, docs/quality.md): one-step word problems whose operation is implied by the wording
(:data:`WORDINGS`: four per operation) and whose label is the final number (``"56"``), so the label carries only
the result of reasoning that the rationale spells out ("'times as many' means we multiply: 7 * 8 = 56."). Half the
wordings are traps: a keyword that a misconception reads as another operation (:attr:`Wording.trap`, "gives" read
as giving away); the synthetic teacher falls for it (qcrd_ray/teacher/backends/synthetic.py). :func:`parse_v2`
reads a problem back into its wording and operands. Version 1's stream is unchanged by the option.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable

SPLITS = ("train", "valid", "test")

_NAMES = [("Tom", "he"), ("Anna", "she"), ("Ravi", "he"), ("Mia", "she"), ("Leo", "he"), ("Sara", "she"),
          ("Omar", "he"), ("Lena", "she"), ("Ken", "he"), ("Ines", "she"), ("Paul", "he"), ("Yuki", "she")]
_ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "cards", "stamps", "shells", "coins",
          "balloons", "toys"]


def _cap(n: int, hi: int | None) -> int:
    return n if hi is None else min(n, hi)


def _add(rng: random.Random, hi: int | None) -> tuple[int, int]:
    return rng.randint(2, _cap(50, hi)), rng.randint(2, _cap(50, hi))


def _sub(rng: random.Random, hi: int | None) -> tuple[int, int]:
    a = rng.randint(3, _cap(60, hi))
    return a, rng.randint(2, a - 1)


def _mul(rng: random.Random, hi: int | None) -> tuple[int, int]:
    return rng.randint(2, _cap(12, hi)), rng.randint(2, _cap(12, hi))


def _div(rng: random.Random, hi: int | None) -> tuple[int, int]:
    if hi is None:
        quotient, divisor = rng.randint(2, 12), rng.randint(2, 10)
    else:  # the dividend is an operand too: keep quotient × divisor <= hi
        divisor = rng.randint(2, min(10, hi // 2))
        quotient = rng.randint(2, min(12, hi // divisor))
    return quotient * divisor, divisor


# (operator, operand sampler, "body\nquestion" with {name} {pron} {Pron} {item} {a} {b})
_TEMPLATES: list[tuple[str, Callable[[random.Random, int | None], tuple[int, int]], str]] = [
    ("+", _add, "{name} has {a} {item}. {Pron} buys {b} more.\nHow many {item} does {pron} have now?"),
    ("+", _add, "{name} found {a} {item} in the morning and {b} {item} in the afternoon.\n"
                "How many {item} did {pron} find in all?"),
    ("-", _sub, "{name} had {a} {item}. {Pron} gave {b} of them to a friend.\nHow many {item} does {pron} have left?"),
    ("-", _sub, "{name} has {a} {item}. A friend has {b} {item}.\nHow many more {item} does {name} have than the friend?"),
    ("*", _mul, "{name} has {a} boxes. Each box holds {b} {item}.\nHow many {item} does {pron} have in all?"),
    ("*", _mul, "{name} buys {a} {item} every day for {b} days.\nHow many {item} does {pron} buy in total?"),
    ("/", _div, "{name} shares {a} {item} equally among {b} friends.\nHow many {item} does each friend get?"),
    ("/", _div, "{name} packs {a} {item} into bags of {b}.\nHow many bags does {pron} fill?"),
]

MAX_PROBLEMS = 200_000  # well under the number of distinct problems the templates can make
MIN_MAX_OPERAND = 4  # the smallest bound that leaves every template an operand range


# A further step on the running total v: (operator, operand sampler or None when v does not allow it, sentence,
# question). The question of the last step ends the problem.
_NEXT_STEPS: list[tuple[str, Callable[[random.Random, int, int | None], int | None], str, str]] = [
    ("+", lambda rng, v, hi: rng.randint(2, _cap(50, hi)), "Then {pron} finds {c} more.",
     "How many {item} does {pron} have now?"),
    ("-", lambda rng, v, hi: rng.randint(2, _cap(v - 1, hi)) if v > 3 else None, "Then {pron} loses {c} of them.",
     "How many {item} are left?"),
    ("*", lambda rng, v, hi: rng.randint(2, 4) if v <= 200 else None, "Then {pron} ends up with {c} times that many.",
     "How many {item} does {pron} have?"),
    ("/", lambda rng, v, hi: rng.choice([d for d in range(2, _cap(10, hi) + 1) if v % d == 0] or [None]),
     "Then {pron} shares them equally among {c} friends.", "How many {item} does each friend get?"),
]


def equation(a: float | str, op: str, b: float) -> str:
    """The SVAMP label format: ``( 84.0 / 2.0 )``; ``a`` may be an equation already (a further step)."""
    return f"( {a if isinstance(a, str) else float(a)} {op} {float(b)} )"


def _problem(rng: random.Random, steps: int = 1, max_operand: int | None = None) -> tuple[str, str]:
    op, operands, template = rng.choice(_TEMPLATES)
    (name, pron), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = operands(rng, max_operand)
    words = dict(name=name, pron=pron, Pron=pron.capitalize(), item=item)
    text = template.format(a=a, b=b, **words)
    label, value = equation(a, op, b), {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    if steps == 1:
        return text, label
    body = [text.split("\n")[0]]
    for _ in range(steps - 1):
        feasible = []
        for step in _NEXT_STEPS:
            c = step[1](rng, value, max_operand)
            if c is not None:
                feasible.append((step, c))
        (op, _, sentence, question), c = rng.choice(feasible)  # "+" is always feasible
        body.append(sentence.format(c=c, **words))
        label = equation(label, op, c)
        value = {"+": value + c, "-": value - c, "*": value * c, "/": value // c}[op]
    return " ".join(body) + "\n" + question.format(**words), label


def make_split(split: str, *, train_size: int, eval_size: int, seed: int = 0, steps: int = 1,
               max_operand: int | None = None, version: int = 1) -> list[dict]:
    """Rows (EXAMPLE_SCHEMA dicts) of one split of the synthetic task; ``steps`` operations per problem, every
    number in the problem (and its label) at most ``max_operand`` when given (None: the full ranges).
    ``version`` 2: testbed v2's wordings with numeric labels (one step only)."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r}: choose one of {', '.join(SPLITS)}")
    if version not in VERSIONS:
        raise ValueError(f"synthetic task: version={version}; choose one of {', '.join(map(str, VERSIONS))}")
    if steps < 1:
        raise ValueError(f"synthetic task: steps={steps}; a problem needs at least one step")
    if version == 2 and steps != 1:
        raise ValueError(f"synthetic task: version 2 problems have one step (steps={steps})")
    if max_operand is not None and max_operand < MIN_MAX_OPERAND:
        raise ValueError(f"synthetic task: max_operand={max_operand}; at least {MIN_MAX_OPERAND}")
    total = 2 * eval_size + train_size
    if total > MAX_PROBLEMS:
        raise ValueError(f"synthetic task: {total} problems requested, at most {MAX_PROBLEMS}")
    start = {"test": 0, "valid": eval_size, "train": 2 * eval_size}[split]
    size = train_size if split == "train" else eval_size
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < start + size:
        text, label = _problem(rng, steps, max_operand) if version == 1 else _problem_v2(rng, max_operand)
        if text not in seen:
            seen.add(text)
            problems.append((text, label))
    return [
        {"id": f"synthetic-{split}-{i}", "task": "synthetic", "input": text, "choices": [], "label": label,
         "rationales": []}
        for i, (text, label) in enumerate(problems[start:])
    ]


# ---- version 2 (testbed v2): the operation is implied by the wording, the label is the final number

VERSIONS = (1, 2)
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_PRONOUNS = {"he": ("him", "his"), "she": ("her", "her")}


@dataclass(frozen=True)
class Wording:
    """One way of asking for ``op`` on the stated numbers a, b (always ``a op b``). ``trap``: the operation a
    misconception reads into ``cue`` (a keyword of the question), None for a wording nobody misreads."""

    op: str
    trap: str | None
    cue: str
    template: str  # "body\nquestion" with {name} {pron} {Pron} {obj} {pos} {item} {a} {b}


WORDINGS: tuple[Wording, ...] = (
    Wording("+", None, "buys more", "{name} has {a} {item}. {Pron} buys {b} more.\n"
                                    "How many {item} does {pron} have now?"),
    Wording("+", None, "in all", "{name} found {a} {item} in the morning and {b} {item} in the afternoon.\n"
                                 "How many {item} did {pron} find in all?"),
    Wording("+", "-", "gives", "{name} has {a} {item}. A friend gives {obj} {b} more.\n"
                               "How many {item} does {pron} have now?"),
    Wording("+", "*", "times", "{name} went to the shop two times. {Pron} bought {a} {item} the first time and {b} "
                               "the second time.\nHow many {item} did {pron} buy?"),
    Wording("-", None, "left", "{name} had {a} {item}. {Pron} gave {b} of them to a friend.\n"
                               "How many {item} does {pron} have left?"),
    Wording("-", None, "lost", "{name} had {a} {item}. {Pron} lost {b} of them.\nHow many {item} are left?"),
    Wording("-", "+", "more than", "{name} has {a} {item}. That is {b} more than {pos} friend has.\n"
                                   "How many {item} does the friend have?"),
    Wording("-", "+", "altogether", "{name} and a friend have {a} {item} altogether. {name} has {b} of them.\n"
                                    "How many {item} does the friend have?"),
    Wording("*", None, "each box", "{name} has {a} boxes. Each box holds {b} {item}.\n"
                                   "How many {item} does {pron} have in all?"),
    Wording("*", None, "times as many", "A friend has {a} {item}. {name} has {b} times as many.\n"
                                        "How many {item} does {name} have?"),
    Wording("*", "+", "for days", "{name} buys {a} {item} every day for {b} days.\n"
                                  "How many {item} does {pron} buy in total?"),
    Wording("*", "/", "piles", "{name} makes {a} piles with {b} {item} in every pile.\n"
                               "How many {item} are in the piles?"),
    Wording("/", None, "shares equally", "{name} shares {a} {item} equally among {b} friends.\n"
                                         "How many {item} does each friend get?"),
    Wording("/", None, "groups of", "{name} puts {a} {item} into groups of {b}.\nHow many groups are there?"),
    Wording("/", "*", "each", "{name} has {a} {item}. Each friend gets {b} of them.\n"
                              "How many friends get {item}?"),
    Wording("/", "-", "gives away", "{name} gives away {a} {item}, {b} to every friend, until none are left.\n"
                                    "How many friends get {item}?"),
)
_V2_OPERANDS = {"+": _add, "-": _sub, "*": _mul, "/": _div}


def _operands_v2(wording: Wording, rng: random.Random, hi: int | None) -> tuple[int, int]:
    # an addition misread as "a - b" draws a > b, so the misread answer stays a positive count
    return _sub(rng, hi) if wording.trap == "-" and wording.op == "+" else _V2_OPERANDS[wording.op](rng, hi)


def answer_v2(op: str, a: float, b: float) -> str:
    """The label text of ``a op b``: ``"56"``, ``"3.5"`` (a misread division need not be whole)."""
    value = _APPLY[op](a, b)
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}".rstrip("0")


def _problem_v2(rng: random.Random, max_operand: int | None) -> tuple[str, str]:
    wording = rng.choice(WORDINGS)
    (name, pron), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = _operands_v2(wording, rng, max_operand)
    obj, pos = _PRONOUNS[pron]
    text = wording.template.format(a=a, b=b, name=name, pron=pron, Pron=pron.capitalize(), obj=obj, pos=pos,
                                   item=item)
    return text, answer_v2(wording.op, a, b)


def _pattern(template: str) -> re.Pattern:
    """A template as a regex: numbers and words captured by name, a repeated field matched as the same text."""
    out, seen = [], set()
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if name is None:
            continue
        if name in seen:
            out.append(f"(?P={name})")
        else:
            seen.add(name)
            out.append(f"(?P<{name}>\\d+)" if name in ("a", "b") else f"(?P<{name}>[A-Za-z]+)")
    return re.compile("".join(out))


_PATTERNS = [(w, _pattern(w.template)) for w in WORDINGS]


def parse_v2(question: str) -> tuple[Wording, int, int]:
    """(wording, a, b) of a version-2 problem. Raises ValueError for any other text."""
    for wording, pattern in _PATTERNS:
        match = pattern.fullmatch(question)
        if match:
            return wording, int(match["a"]), int(match["b"])
    raise ValueError(f"not a synthetic version-2 problem: {question[:80]!r}")


# ---- what a version-2 rationale gets right (evaluate's explain-mode diagnosis; docs/quality.md, "What QCRD does
# to its rationales")

V2_RATIONALE_CHECKS = ("trap_operation", "both_numbers")
_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?) ([-+*/]) (-?\d+(?:\.\d+)?) =")
_OPERATION_WORDS = {word: op for op, words in {"+": ("add", "addition"), "-": ("subtract", "subtraction"),
                                               "*": ("multiply", "multiplication"), "/": ("divide", "division")}.items()
                    for word in words}
_OPERATION_WORD = re.compile(r"\b(" + "|".join(_OPERATION_WORDS) + r")\b")


def rationale_operation(rationale: str) -> tuple[str | None, tuple[float, float] | None]:
    """(operation, operands) a rationale applies: its first ``a op b =`` equation's, else the first operation it
    names in words ("we multiply") with no operands; (None, None) when it names none."""
    equation = _EQUATION.search(rationale)
    if equation:
        return equation[2], (float(equation[1]), float(equation[3]))
    word = _OPERATION_WORD.search(rationale)
    return (_OPERATION_WORDS[word[1]], None) if word else (None, None)


def check_rationale_v2(question: str, rationale: str) -> dict[str, bool | None] | None:
    """What a student's rationale for a version-2 question gets right, or None for another kind of question:

    - ``trap_operation``: on a trap wording, it applies the wording's operation, not the misconception's (None on
      other wordings, which the teacher never misreads);
    - ``both_numbers``: its equation states the question's two numbers, in order (every answer needs them).

    A rationale with no readable operation gets neither."""
    try:
        wording, a, b = parse_v2(question)
    except ValueError:
        return None
    op, operands = rationale_operation(rationale)
    return {"trap_operation": op == wording.op if wording.trap is not None else None,
            "both_numbers": operands == (a, b)}


def check_rationale(data, question: str, rationale: str) -> dict[str, bool | None] | None:
    """The built-in task's rationale checks (``TaskSpec.check_rationale``) under its ``data`` config: testbed v2's
    (:func:`check_rationale_v2`); version 1 has none (its one-step questions share v2's wordings, not its traps)."""
    return check_rationale_v2(question, rationale) if data.synthetic_version == 2 else None
