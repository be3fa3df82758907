"""Self-consistency (docs/design.md, "The algorithm"): split one example's K teacher samples into positives and teacher negatives.

Pure: no Ray, no torch. Answers are grouped by `answers.answer_key` (so ``8``, ``8.0`` and ``( 5.0 + 3.0 )``
are one answer). Samples without a usable answer (failed request, no ``<Answer>``, an answer that has no key)
neither vote nor become negatives: they stay visible in the row's ``samples`` with their status.

Positives and negatives are rationale texts without their answer; qcrd/targets.py appends to each the answer its
own sample gave (found through ``samples``). An answer given without any rationale votes but adds no rationale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from qcrd_ray.data import answers

POSITIVE_RULES = ("majority", "gold")


@dataclass(frozen=True)
class Consistency:
    positives: list[str]  # rationales, distinct, in sample order
    negatives: list[str]
    majority_answer: str | None  # as the first sample of the winning group wrote it
    agreement: float  # share of answered samples that gave the majority answer (0.0 when none answered)
    teacher_correct: bool  # the majority answer is correct against gold


def _rationales(samples) -> list[str]:
    return list(dict.fromkeys(r for s in samples if (r := (s.get("rationale") or "").strip())))


def self_consistency(
    task: str, samples: Sequence[Mapping], gold: str, choices: Sequence[str] = (), rule: str = "majority"
) -> Consistency:
    """``samples``: dicts with ``index``, ``rationale``, ``answer``, ``status`` (order does not matter).

    Majority: the most frequent answer wins; on a tie the tied answer that matches gold wins, else the first
    by count then by the lexical order of its key. ``rule="majority"``: the winning answer's rationales are
    positives, the others' are negatives. ``rule="gold"``: positives are the samples whose answer is correct
    against gold, negatives the answered ones that are not. Either way the majority, agreement and
    teacher_correct describe the teacher's vote.
    """
    if rule not in POSITIVE_RULES:
        raise ValueError(f"positive_rule {rule!r}: choose one of {', '.join(POSITIVE_RULES)}")
    choices = tuple(choices)
    groups: dict[str, list[Mapping]] = {}
    for s in sorted(samples, key=lambda s: s["index"]):
        if s.get("status") != "ok" or s.get("answer") is None:
            continue
        key = answers.answer_key(task, s["answer"], choices)
        if key is not None:
            groups.setdefault(key, []).append(s)
    if not groups:
        return Consistency([], [], None, 0.0, False)

    correct = {key: answers.is_correct(task, group[0]["answer"], gold, choices) for key, group in groups.items()}
    top = max(len(g) for g in groups.values())
    tied = sorted(key for key, g in groups.items() if len(g) == top)
    winner = next((key for key in tied if correct[key]), tied[0])
    n_answered = sum(len(g) for g in groups.values())
    majority = groups[winner][0]["answer"]

    in_order = sorted(((key, s) for key, g in groups.items() for s in g), key=lambda ks: ks[1]["index"])
    is_positive = (lambda key: key == winner) if rule == "majority" else (lambda key: correct[key])
    return Consistency(
        positives=_rationales(s for key, s in in_order if is_positive(key)),
        negatives=_rationales(s for key, s in in_order if not is_positive(key)),
        majority_answer=majority,
        agreement=len(groups[winner]) / n_answered,
        teacher_correct=correct[winner],
    )


def teacher_row(example: Mapping, samples: Sequence[Mapping], task=None, rule: str = "majority") -> dict:
    """One TEACHER_SCHEMA row: the example's columns (without ``rationales``), self-consistency and every raw
    sample (sorted by index) with its parse status. ``task``: a name or `TaskSpec` (default: the row's task)."""
    choices = tuple(example.get("choices") or ())
    sc = self_consistency(task or example["task"], samples, example["label"], choices, rule)
    return {
        "id": example["id"],
        "task": example["task"],
        "input": example["input"],
        "choices": list(choices),
        "label": example["label"],
        "positives": sc.positives,
        "negatives": sc.negatives,
        "majority_answer": sc.majority_answer,
        "agreement": sc.agreement,
        "teacher_correct": sc.teacher_correct,
        "samples": [
            {
                "index": int(s["index"]),
                "text": s.get("text") or "",
                "rationale": s.get("rationale") or "",
                "answer": s.get("answer"),
                "status": s["status"],
                "error": s.get("error") or "",
            }
            for s in sorted(samples, key=lambda s: s["index"])
        ],
    }
