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
"""

from __future__ import annotations

import random
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
               max_operand: int | None = None) -> list[dict]:
    """Rows (EXAMPLE_SCHEMA dicts) of one split of the synthetic task; ``steps`` operations per problem, every
    number in the problem (and its label) at most ``max_operand`` when given (None: the full ranges)."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r}: choose one of {', '.join(SPLITS)}")
    if steps < 1:
        raise ValueError(f"synthetic task: steps={steps}; a problem needs at least one step")
    if max_operand is not None and max_operand < MIN_MAX_OPERAND:
        raise ValueError(f"synthetic task: max_operand={max_operand}; at least {MIN_MAX_OPERAND}")
    total = 2 * eval_size + train_size
    if total > MAX_PROBLEMS:
        raise ValueError(f"synthetic task: {total} problems requested, at most {MAX_PROBLEMS}")
    start = {"test": 0, "valid": eval_size, "train": 2 * eval_size}[split]
    size = train_size if split == "train" else eval_size
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < start + size:
        text, label = _problem(rng, steps, max_operand)
        if text not in seen:
            seen.add(text)
            problems.append((text, label))
    return [
        {"id": f"synthetic-{split}-{i}", "task": "synthetic", "input": text, "choices": [], "label": label,
         "rationales": []}
        for i, (text, label) in enumerate(problems[start:])
    ]
