"""The task registry (`BUILTIN_TASKS`): one `TaskSpec` per built-in task, the only place that says what a task is.

A spec owns the task's answer type (how answers are parsed and scored), its fixed labels, the teacher prompt's
worked example, and its input: the structured fields a serve request may send instead of the formatted text, how
they become that text (as the loaders format the data), and whether the text lists its choices. The config's
``data.task`` help, serve's task names and request checks, and the teacher prompt read it; a user task (``data.format:
jsonl | parquet``) is a spec made by :func:`get_task`. Adding a built-in task is one `register_task` call (its DSS
row builder in the dss entry of formats.py if its data comes in the DSS layout) and its test. A task may also say
what its rationales must get right (``check_rationale``: testbed v2's operation and numbers), which evaluate
reports in explain mode. Pure and light: config.py reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from qcrd_ray.data import synthetic

NLI_LABELS = ("entailment", "neutral", "contradiction")  # DSS label ids 0, 1, 2

ANSWER_TYPES = ("numeric", "choice", "text")


class FieldError(ValueError):
    """A structured input field a task cannot take: ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------------------------------------------
# input formats (the loaders write the data so; serve formats structured requests the same way)


def cqa_input(question: str, choices: Sequence[str]) -> str:
    """A multiple-choice question as the student sees it: the question, then ``Answer Choices:`` (a) … (e) …"""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return question + "\nAnswer Choices:" + "".join(f"\n({letters[i]}) {c}" for i, c in enumerate(choices))


_CHOICES_TAIL = re.compile(r"\nAnswer Choices:(.*)$", re.S)
_CHOICE_ITEM = re.compile(r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)", re.S)


def parse_choices(text: str) -> list[str]:
    """The choices of a :func:`cqa_input` text (also accepts them on one line); [] when it has none."""
    tail = _CHOICES_TAIL.search(text)
    return [m.group(2) for m in _CHOICE_ITEM.finditer(tail.group(1))] if tail else []


def nli_input(premise: str, hypothesis: str) -> str:
    """An NLI pair as the student sees it."""
    return f"premise: {premise} hypothesis: {hypothesis}"


def _cqa_fields(question: str, choices: list[str]) -> tuple[str, tuple[str, ...]]:
    if not 2 <= len(choices) <= 26 or not all(c.strip() for c in choices):
        raise FieldError("choices", "choices: give 2 to 26 non-empty choices")
    return cqa_input(question, choices), tuple(choices)


def _nli_fields(premise: str, hypothesis: str) -> tuple[str, tuple[str, ...]]:
    return nli_input(premise, hypothesis), ()


# --------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class TaskSpec:
    """``answer_type``: ``numeric`` (the answer is an equation or number, scored by value), ``choice`` (one of
    the row's choices, or of ``labels`` when the task has fixed labels), ``text`` (normalised exact match)."""

    name: str
    answer_type: str
    labels: tuple[str, ...] = ()
    # the teacher prompt's instruction and worked example (data/prompts.py): numeric, choice, nli or text; "" = the
    # answer type's (a choice task whose row has no choices gets text's)
    prompt: str = ""
    # the structured fields a request may send instead of the input text (serve), in order, and
    # ``from_fields(*values) -> (input text, choices)``, which raises FieldError for values it cannot take
    fields: tuple[str, ...] = ()
    from_fields: Callable[..., tuple[str, tuple[str, ...]]] | None = None
    choices_in_input: bool = False  # the input text lists the choices (parse_choices reads them back)
    # explain mode's diagnosis (evaluate): ``check_rationale(data config, input text, rationale) -> {check: bool |
    # None}`` says what a student's rationale gets right (None: a check that does not apply to that question; the
    # whole result None: a question the task cannot check), over the checks named in ``rationale_checks``
    rationale_checks: tuple[str, ...] = ()
    check_rationale: Callable[..., dict[str, bool | None] | None] | None = None

    @property
    def is_nli(self) -> bool:
        return self.labels == NLI_LABELS


BUILTIN_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a built-in task; returns it."""
    BUILTIN_TASKS[spec.name] = spec
    return spec


register_task(TaskSpec("synthetic", "numeric", rationale_checks=synthetic.V2_RATIONALE_CHECKS,
                       check_rationale=synthetic.check_rationale))
register_task(TaskSpec("svamp", "numeric"))
register_task(TaskSpec("cqa", "choice", fields=("question", "choices"), from_fields=_cqa_fields,
                       choices_in_input=True))
register_task(TaskSpec("anli1", "choice", NLI_LABELS, prompt="nli", fields=("premise", "hypothesis"),
                       from_fields=_nli_fields))
register_task(TaskSpec("esnli", "choice", NLI_LABELS, prompt="nli", fields=("premise", "hypothesis"),
                       from_fields=_nli_fields))


def get_task(name: str, answer_type: str = "auto") -> TaskSpec:
    """The spec of a built-in task, or of a user task. ``answer_type="auto"`` keeps a built-in task's type; a
    user task with ``auto`` is ``choice`` (scored against each row's choices when it has them, else as ``text``)."""
    if answer_type != "auto" and answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type {answer_type!r}: choose one of auto, {', '.join(ANSWER_TYPES)}")
    spec = BUILTIN_TASKS.get(name)
    if spec is None:
        spec = TaskSpec(name, "choice")
    if answer_type != "auto" and answer_type != spec.answer_type:
        spec = TaskSpec(name, answer_type, spec.labels if answer_type == "choice" else ())
    return spec


def as_task(task: "str | TaskSpec") -> TaskSpec:
    """Accept a task name or a spec (user tasks with an explicit answer_type pass their spec)."""
    return task if isinstance(task, TaskSpec) else get_task(task)
