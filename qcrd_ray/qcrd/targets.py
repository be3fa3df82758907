"""Explain-task targets: the one module that turns teacher rows into the texts the student learns and D judges.

A teacher row stores rationale texts without their answers (teacher/consistency.py). Every target is
``prompts.explain_target(rationale, answer)``:

- a positive: its rationale with the answer *its own sample* gave (under ``positive_rule: majority`` that is the
  majority answer; under ``gold`` it is the gold one even where the majority is wrong); the majority answer stands
  in only for rows without samples;
- a teacher negative: its rationale with the wrong answer its own sample gave, so the student is pushed away from
  the wrong reasoning *and* the answer it led to; without a matching sample the bare rationale (pushing away
  "reasoning + the right answer" would unteach the answer);
- a student negative: the sampler's raw ``explain:`` output, which already ends in its own answer;
- ``dss`` (one rationale per example, as distilling step-by-step): the first parsed teacher sample with its own
  answer, whatever that answer is (the single-sample setting), else the first positive; under
  ``loss.dss_rationale: gold`` (clean-DSS, the headroom control) the first sample whose answer is the gold label,
  else none.

Which of these a method trains on is the function registered under its name (``@register_targets``, one per
method of qcrd_ray/methods.py); the ``loss.positives`` / ``loss.negatives`` ablation switches select among QCRD's.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from qcrd_ray.config import Config
from qcrd_ray.data import answers, prompts
from qcrd_ray.data.tasks import TaskSpec, get_task
from qcrd_ray.methods import method_spec

# method name -> its explain targets of one teacher row under a config: (positives, negatives)
TARGETS: dict[str, Callable[[Mapping, Config], tuple[list[str], list[str]]]] = {}


def register_targets(method: str):
    """Decorator: ``fn(row, cfg) -> (positives, negatives)`` is the explain targets of ``method``."""

    def register(fn):
        TARGETS[method] = fn
        return fn

    return register


def sample_answers(row: Mapping) -> dict[str, str]:
    """rationale text → the answer its sample gave, for the row's parsed samples."""
    return {s["rationale"].strip(): s["answer"] for s in row.get("samples") or []
            if s.get("status") == "ok" and s.get("rationale") and s.get("answer")}


def teacher_targets(row: Mapping) -> tuple[list[str], list[str]]:
    """Every teacher positive and teacher negative of ``row`` as an explain target (positives without a known
    answer are left out; a negative without one keeps its bare rationale)."""
    answers, majority = sample_answers(row), row.get("majority_answer")
    pos = [prompts.explain_target(r, answers.get(r.strip(), majority))
           for r in row.get("positives") or [] if r.strip() in answers or majority]
    neg = [prompts.explain_target(r, answers[r.strip()]) if r.strip() in answers else r.strip()
           for r in row.get("negatives") or []]
    return pos, neg


def student_negatives(row: Mapping) -> list[str]:
    return [t.strip() for t in row.get("student_negatives") or [] if t and t.strip()]


def one_rationale(row: Mapping, rule: str = "first", task: str | TaskSpec | None = None) -> str | None:
    """DSS's single target. ``rule="first"``: the first parsed teacher sample with its own answer, else the first
    positive. ``rule="gold"``: the first parsed sample whose answer is the gold label (scored as ``task``, default
    the row's), else None: clean rationales only."""
    if rule not in ("first", "gold"):
        raise ValueError(f"dss_rationale {rule!r}: choose first or gold")
    for s in sorted(row.get("samples") or [], key=lambda s: s.get("index", 0)):
        if s.get("status") == "ok" and s.get("rationale") and s.get("answer"):
            if rule == "gold" and not answers.is_correct(task or row["task"], s["answer"], row["label"],
                                                         row.get("choices") or ()):
                continue
            return prompts.explain_target(s["rationale"], s["answer"])
    if rule == "gold":
        return None
    positives = row.get("positives") or []
    if positives and row.get("majority_answer"):
        return prompts.explain_target(positives[0], row["majority_answer"])
    return None


@register_targets("finetune")
def no_targets(row: Mapping, cfg: Config) -> tuple[list[str], list[str]]:
    """Label only: no explain task."""
    return [], []


@register_targets("dss")
def dss_targets(row: Mapping, cfg: Config) -> tuple[list[str], list[str]]:
    """One rationale per example (:func:`one_rationale` under ``loss.dss_rationale``), no negatives."""
    target = one_rationale(row, cfg.loss.dss_rationale, get_task(cfg.data.task, cfg.data.answer_type))
    return ([target] if target else []), []


@register_targets("qcrd")
def qcrd_targets(row: Mapping, cfg: Config) -> tuple[list[str], list[str]]:
    """Every teacher positive against the negatives the NK switch keeps (``loss.positives: single``: the first
    positive alone)."""
    pos, teacher_neg = teacher_targets(row)
    if cfg.loss.positives == "single":
        pos = pos[:1]
    neg: list[str] = []
    if cfg.loss.negatives in ("teacher", "both"):
        neg += teacher_neg
    if cfg.loss.negatives in ("student", "both"):
        neg += student_negatives(row)
    return pos, neg


def candidate_targets(row: Mapping, cfg: Config) -> tuple[list[str], list[str]]:
    """The explain targets ``(positives, negatives)`` of one row under ``cfg.train.method`` and the ED/NK
    switches (``loss.positives``, ``loss.negatives``)."""
    return TARGETS[method_spec(cfg).name](row, cfg)


def tokenizer_texts(rows: Iterable[Mapping]) -> list[str]:
    """Everything the student reads or writes for teacher ``rows``, whatever the method: both inputs, the label
    and every teacher target (the tiny student's tokenizer is trained on these)."""
    texts: list[str] = []
    for row in rows:
        texts += [prompts.student_input("predict", row["input"]), prompts.student_input("explain", row["input"]),
                  row["label"]]
        pos, neg = teacher_targets(row)
        dss = one_rationale(row)
        texts += pos + neg + ([dss] if dss else [])
    return texts
