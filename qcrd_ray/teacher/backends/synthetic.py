"""A rule-based noisy teacher for equation-labelled tasks (the built-in synthetic task, also svamp).

It reads the gold equation (``( 5.0 + 3.0 )``) and writes a correct step-by-step rationale and answer in the
same ``<Explanation>: … <Answer>: …`` format as a real teacher. With a probability that grows with the
temperature it makes one of three mistakes: a wrong operator, wrong arithmetic, or a malformed output without
``<Answer>``. Each sample draws from its own seed, so runs are reproducible and samples of one question differ,
which gives self-consistency real work to do. Like a real teacher, it also has systematic errors: on a "hard"
question (a fixed share, chosen by the question) it errs twice as often and mostly with the same wrong operator,
so some majorities are wrong and the gold rule differs from the majority rule.

``teacher.noise`` turns the temperature-driven rate into a dial (the quality testbed, docs/quality.md): the
expected share of samples with a mistake is exactly ``noise``, split between ordinary and hard questions by
:func:`mistake_rates`. A label with several operations (``( ( 5.0 + 3.0 ) * 2.0 )``) is reasoned step by step
("5 + 3 = 8. 8 * 2 = 16."); a wrong operator or an arithmetic slip in one step carries into the later ones.

Testbed v2 (``data.synthetic_version: 2``, :func:`synthetic_v2_sample`) reads the question instead of the label:
it names the operation the wording implies, then computes it, in one of :data:`V2_TEMPLATES` (several correct
phrasings per question). Its one kind of mistake is systematic: on a trap wording (``Wording.trap``, a feature of
the question) each sample falls for the misconception with probability ``noise``, and always for the same wrong
operation, so a student that copies its rationales learns the misconception. Other wordings are never wrong.
"""

from __future__ import annotations

import random

from qcrd_ray.data import synthetic as synthetic_task
from qcrd_ray.data.arith import safe_eval
from qcrd_ray.teacher.backends.base import Completion, TeacherBackend

OPERATORS = ("+", "-", "*", "/")
MISTAKES = ("operator", "arithmetic", "malformed")
HARD_SHARE = 0.2


def mistake_probability(temperature: float) -> float:
    """5 % at temperature 0 (a greedy teacher still errs), about 37 % at the paper's 0.7, capped at 90 %."""
    return min(0.9, 0.05 + 0.45 * temperature)


def mistake_rates(noise: float | None, temperature: float, hard_share: float = HARD_SHARE) -> tuple[float, float]:
    """(ordinary, hard) per-sample mistake probabilities. With ``noise`` set, a hard question errs at
    min(0.9, 2·noise) and an ordinary one at what makes the average over questions exactly ``noise``."""
    if noise is None:
        p = mistake_probability(temperature)
        return p, min(0.9, 2 * p)
    hard = min(0.9, 2 * noise)
    return (noise - hard_share * hard) / (1 - hard_share), hard


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


def synthetic_output(label: str, seed: int, temperature: float, question: str = "", noise: float | None = None,
                     hard_share: float = HARD_SHARE) -> str:
    """The teacher's text for one sample (``seed``) of a question (key ``question``, e.g. its id) whose gold
    equation is ``label``. Raises ValueError when ``label`` is not an equation this teacher can read."""
    return synthetic_sample(label, seed, temperature, question, noise, hard_share)[0]


def synthetic_sample(label: str, seed: int, temperature: float, question: str = "", noise: float | None = None,
                     hard_share: float = HARD_SHARE) -> tuple[str, str | None]:
    """(text, mistake): :func:`synthetic_output` and the mistake it made (one of MISTAKES, or None)."""
    rng, qrng = random.Random(seed), random.Random(f"{question}\x00{label}")
    hard, misconception = qrng.random() < hard_share, qrng.choice(OPERATORS)
    tokens = label.split()
    value = safe_eval(label)
    ordinary_p, hard_p = mistake_rates(noise, temperature, hard_share)
    mistake = rng.choice(MISTAKES) if rng.random() < (hard_p if hard else ordinary_p) else None
    if mistake and hard and rng.random() < 0.8:
        mistake = "operator"
    ops = [i for i, t in enumerate(tokens) if t in OPERATORS]
    if len(ops) > 1:
        try:
            return _multi_step(tokens, ops, rng, mistake, misconception if hard else None)
        except (ValueError, IndexError):
            pass  # not fully bracketed (a user's SVAMP-style label): reasoned in one line below
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
        return explanation + " So the answer", mistake  # cut off before <Answer>, like a truncated generation
    # The answer is the equation reasoned with (SVAMP's label form), so a small student can state it without
    # doing arithmetic; after an arithmetic slip the teacher answers with its wrong value.
    return f"{explanation} <Answer>: {_fmt(value) if mistake == 'arithmetic' else steps}", mistake


class _Stuck(Exception):
    """A multi-step rationale cannot go on: a carried mistake made a divisor zero."""


_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def _parse(tokens: list[str], i: int = 0):
    """``( x op y )`` with nested x, y → (tree, next index); a tree is a number or (op, left, right)."""
    if tokens[i] != "(":
        return float(tokens[i]), i + 1
    left, i = _parse(tokens, i + 1)
    op = tokens[i]
    right, i = _parse(tokens, i + 1)
    if op not in _APPLY or tokens[i] != ")":
        raise ValueError(f"not a bracketed equation at token {i}: {' '.join(tokens)}")
    return (op, left, right), i + 1


def _multi_step(tokens: list[str], ops: list[int], rng: random.Random, mistake: str | None,
                misconception: str | None) -> tuple[str, str | None]:
    """A rationale with one line per operation (innermost first); a mistake hits one step and carries on."""
    tree, end = _parse(tokens)
    if end != len(tokens):
        raise ValueError(f"trailing tokens after the equation: {' '.join(tokens)}")
    where = rng.randrange(len(ops))  # the step (in evaluation order) the mistake hits
    slip = rng.choice((-10, -2, -1, 1, 2, 10))
    lines: list[str] = []

    def walk(node):
        if not isinstance(node, tuple):
            return node, str(node)
        op, left, right = node
        (a, a_text), (b, b_text) = walk(left), walk(right)
        step = len(lines)
        if mistake == "operator" and step == where:
            wrong = [o for o in OPERATORS if o != op and not (o == "/" and b == 0)]
            op = misconception if misconception in wrong else rng.choice(wrong)
        if op == "/" and b == 0:
            raise _Stuck  # an earlier step's mistake made this divisor zero
        value = _APPLY[op](a, b)
        if mistake == "arithmetic" and step == where:
            value += slip
        lines.append(f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(value)}.")
        return value, f"( {a_text} {op} {b_text} )"

    try:
        value, text = walk(tree)
    except _Stuck:  # the teacher stops where its slip leads to dividing by zero, like a truncated generation
        mistake = "malformed"
    explanation = "<Explanation>: Step by step: " + " ".join(lines)
    if mistake == "malformed":
        return explanation + " So the answer", mistake
    return f"{explanation} <Answer>: {_fmt(value) if mistake == 'arithmetic' else text[2:-2]}", mistake


OPERATOR_NOUNS = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}
# Correct phrasings of one v2 rationale: each names the operation the wording implies ({cue}), then computes it.
V2_TEMPLATES = (
    '"{cue}" means we {verb}: {a} {op} {b} = {value}.',
    'The words "{cue}" tell us to {verb}. {a} {op} {b} = {value}.',
    'We {verb} because the question says "{cue}". So {a} {op} {b} = {value}.',
    'This is {noun}, as "{cue}" shows. {a} {op} {b} = {value}.',
)


def synthetic_v2_sample(question: str, seed: int, temperature: float, noise: float | None = None
                        ) -> tuple[str, str | None]:
    """(text, mistake) of one sample (``seed``) on a testbed-v2 question: mistake is ``"misconception"`` (the
    trap wording read as its trap operation; probability ``noise``, or :func:`mistake_probability` of the
    temperature when None) or None. Raises ValueError for a question that is not a v2 problem."""
    wording, a, b = synthetic_task.parse_v2(question)
    rng = random.Random(seed)
    p = mistake_probability(temperature) if noise is None else noise
    misread = wording.trap is not None and rng.random() < p
    op = wording.trap if misread else wording.op
    value = synthetic_task.answer_v2(op, a, b)
    text = rng.choice(V2_TEMPLATES).format(cue=wording.cue, verb=OPERATOR_WORDS[op], noun=OPERATOR_NOUNS[op],
                                           a=a, op=op, b=b, value=value)
    return f"<Explanation>: {text} <Answer>: {value}", "misconception" if misread else None


class SyntheticBackend(TeacherBackend):
    def complete(self, rows: list[dict]) -> list[Completion]:
        out = []
        for row in rows:
            tc = self.cfg.teacher
            if self.cfg.data.synthetic_version == 2:
                try:
                    out.append(Completion(text=synthetic_v2_sample(row["input"], row["seed"], tc.temperature,
                                                                   tc.noise)[0]))
                except ValueError as e:
                    out.append(Completion(error=f"synthetic teacher (version 2) cannot read the question: {e}"))
                continue
            try:
                out.append(Completion(text=synthetic_output(row["label"], row["seed"], tc.temperature, row["id"],
                                                            tc.noise, tc.hard_share)))
            except (ValueError, ArithmeticError) as e:
                out.append(Completion(error=f"synthetic teacher cannot read label {row['label']!r}: {e}"))
        return out
