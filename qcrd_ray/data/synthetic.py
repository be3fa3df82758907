"""The built-in task: SVAMP-style arithmetic word problems, generated from a seed (no download).

Each problem is one template over + - * / with small operands; the gold label is an SVAMP-style equation
``( 5.0 + 3.0 )`` (the rule-based synthetic teacher parses operands and operator back out of it). Answers are
positive integers: subtraction keeps the larger operand first and division is exact, so a tiny T5 learns the task
in minutes.

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


def _add(rng: random.Random) -> tuple[int, int]:
    return rng.randint(2, 50), rng.randint(2, 50)


def _sub(rng: random.Random) -> tuple[int, int]:
    a = rng.randint(3, 60)
    return a, rng.randint(2, a - 1)


def _mul(rng: random.Random) -> tuple[int, int]:
    return rng.randint(2, 12), rng.randint(2, 12)


def _div(rng: random.Random) -> tuple[int, int]:
    quotient, divisor = rng.randint(2, 12), rng.randint(2, 10)
    return quotient * divisor, divisor


# (operator, operand sampler, "body\nquestion" with {name} {pron} {Pron} {item} {a} {b})
_TEMPLATES: list[tuple[str, Callable[[random.Random], tuple[int, int]], str]] = [
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


def equation(a: float, op: str, b: float) -> str:
    """The SVAMP label format: ``( 84.0 / 2.0 )``."""
    return f"( {float(a)} {op} {float(b)} )"


def _problem(rng: random.Random) -> tuple[str, str]:
    op, operands, template = rng.choice(_TEMPLATES)
    (name, pron), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = operands(rng)
    text = template.format(name=name, pron=pron, Pron=pron.capitalize(), item=item, a=a, b=b)
    return text, equation(a, op, b)


def make_split(split: str, *, train_size: int, eval_size: int, seed: int = 0) -> list[dict]:
    """Rows (EXAMPLE_SCHEMA dicts) of one split of the synthetic task."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r}: choose one of {', '.join(SPLITS)}")
    total = 2 * eval_size + train_size
    if total > MAX_PROBLEMS:
        raise ValueError(f"synthetic task: {total} problems requested, at most {MAX_PROBLEMS}")
    start = {"test": 0, "valid": eval_size, "train": 2 * eval_size}[split]
    size = train_size if split == "train" else eval_size
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < start + size:
        text, label = _problem(rng)
        if text not in seen:
            seen.add(text)
            problems.append((text, label))
    return [
        {"id": f"synthetic-{split}-{i}", "task": "synthetic", "input": text, "choices": [], "label": label,
         "rationales": []}
        for i, (text, label) in enumerate(problems[start:])
    ]
