"""Teacher rationales as explain-task targets: one definition shared by the training step and D's training.

A teacher row stores rationale texts without their answers (teacher/consistency.py). The student learns, and D
judges, ``prompts.explain_target(rationale, answer)``: each rationale with the answer its own sample gave (under
``positive_rule: gold`` a positive's answer is the gold one even where the majority is wrong); the majority
answer stands in for rows without samples. Student negatives are the sampler's raw ``explain:`` outputs, which
already end in an answer.
"""

from __future__ import annotations

from typing import Mapping

from qcrd_ray.data import prompts


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
