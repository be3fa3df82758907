"""A rule-based noisy teacher for equation-labelled tasks (the built-in synthetic task, also svamp).

It reads the gold equation (``( 5.0 + 3.0 )``) and writes a correct step-by-step rationale and answer in the
same ``<Explanation>: … <Answer>: …`` format as a real teacher. With a probability that grows with the
temperature it makes one of three mistakes: a wrong operator, wrong arithmetic, or a malformed output without
``<Answer>``. Each sample draws from its own seed, so runs are reproducible and samples of one question differ,
which gives self-consistency real work to do. Like a real teacher, it also has systematic errors: on a "hard"
question (a fixed share, chosen by the question) it errs twice as often and mostly with the same wrong operator,
so some majorities are wrong and the gold rule differs from the majority rule.
"""

from __future__ import annotations

import random

from qcrd_ray.data.arith import safe_eval
from qcrd_ray.teacher.backends.base import Completion, TeacherBackend

OPERATORS = ("+", "-", "*", "/")
MISTAKES = ("operator", "arithmetic", "malformed")
HARD_SHARE = 0.2


def mistake_probability(temperature: float) -> float:
    """5 % at temperature 0 (a greedy teacher still errs), about 37 % at the paper's 0.7, capped at 90 %."""
    return min(0.9, 0.05 + 0.45 * temperature)


OPERATOR_WORDS = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}
# Several phrasings of one reasoning, so a question's correct samples are distinct positives (as a real
# teacher's are) and the many-to-one selection over positives has something to choose from.
TEMPLATES = (
    "We need to compute {steps}. {steps} = {value}.",
    "The question asks us to {verb}: {steps} = {value}.",
    "To find the answer we {verb} the numbers. {steps} gives {value}.",
)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}".rstrip("0")


def synthetic_output(label: str, seed: int, temperature: float, question: str = "") -> str:
    """The teacher's text for one sample (``seed``) of a question (key ``question``, e.g. its id) whose gold
    equation is ``label``. Raises ValueError when ``label`` is not an equation this teacher can read."""
    rng, qrng = random.Random(seed), random.Random(f"{question}\x00{label}")
    hard, misconception = qrng.random() < HARD_SHARE, qrng.choice(OPERATORS)
    tokens = label.split()
    value = safe_eval(label)
    p = min(0.9, mistake_probability(temperature) * (2 if hard else 1))
    mistake = rng.choice(MISTAKES) if rng.random() < p else None
    if mistake and hard and rng.random() < 0.8:
        mistake = "operator"
    ops = [i for i, t in enumerate(tokens) if t in OPERATORS]
    if mistake == "operator" and ops:
        i = rng.choice(ops)
        wrong = [op for op in OPERATORS if op != tokens[i]]
        tokens[i] = misconception if hard and misconception in wrong else rng.choice(wrong)
        try:
            value = safe_eval(" ".join(tokens))
        except (ValueError, ZeroDivisionError, ArithmeticError):
            tokens = label.split()  # the swap divided by zero: err in the arithmetic instead
            mistake = "arithmetic"
    if mistake == "arithmetic" or (mistake == "operator" and not ops):
        value = value + rng.choice((-10, -2, -1, 1, 2, 10))
    steps = " ".join(tokens).strip()
    if steps.startswith("(") and steps.endswith(")"):
        steps = steps[1:-1].strip()
    verb = next((OPERATOR_WORDS[t] for t in tokens if t in OPERATOR_WORDS), "compute")
    explanation = "<Explanation>: " + rng.choice(TEMPLATES).format(steps=steps, value=_fmt(value), verb=verb)
    if mistake == "malformed":
        return explanation + " So the answer"  # cut off before <Answer>, like a truncated generation
    # The answer is the equation reasoned with (SVAMP's label form), so a small student can state it without
    # doing arithmetic; after an arithmetic slip the teacher answers with its wrong value.
    return f"{explanation} <Answer>: {_fmt(value) if mistake == 'arithmetic' else steps}"


class SyntheticBackend(TeacherBackend):
    needs_prompt = False

    def complete(self, rows: list[dict]) -> list[Completion]:
        out = []
        for row in rows:
            try:
                out.append(Completion(text=synthetic_output(row["label"], row["seed"], self.cfg.teacher.temperature, row["id"])))
            except (ValueError, ArithmeticError) as e:
                out.append(Completion(error=f"synthetic teacher cannot read label {row['label']!r}: {e}"))
        return out
