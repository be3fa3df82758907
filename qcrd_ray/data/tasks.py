"""What kind of answer each task has, which decides how answers are parsed and scored."""

from __future__ import annotations

from dataclasses import dataclass

NLI_LABELS = ("entailment", "neutral", "contradiction")  # DSS label ids 0, 1, 2

ANSWER_TYPES = ("numeric", "choice", "text")


@dataclass(frozen=True)
class TaskSpec:
    """``answer_type``: ``numeric`` (the answer is an equation or number, scored by value), ``choice`` (one of
    the row's choices, or of ``labels`` when the task has fixed labels), ``text`` (normalised exact match)."""

    name: str
    answer_type: str
    labels: tuple[str, ...] = ()

    @property
    def is_nli(self) -> bool:
        return self.labels == NLI_LABELS


BUILTIN_TASKS = {
    "synthetic": TaskSpec("synthetic", "numeric"),
    "svamp": TaskSpec("svamp", "numeric"),
    "cqa": TaskSpec("cqa", "choice"),
    "anli1": TaskSpec("anli1", "choice", NLI_LABELS),
    "esnli": TaskSpec("esnli", "choice", NLI_LABELS),
}


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
