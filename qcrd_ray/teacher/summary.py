"""Run statistics of a teacher output (pure): what a user checks before training on it."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

from qcrd_ray.teacher.samples import SAMPLE_STATUSES


def summarize(rows: Iterable[Mapping]) -> dict:
    """``rows``: TEACHER_SCHEMA dicts. Agreement histogram keys are the agreement rounded to 2 decimals
    ("none" where no sample gave an answer); shares and means are over examples."""
    n = samples = correct = no_positive = positives = negatives = 0
    statuses: Counter = Counter({s: 0 for s in SAMPLE_STATUSES})
    agreement: Counter = Counter()
    agreement_sum = 0.0
    for row in rows:
        n += 1
        samples += len(row["samples"])
        statuses.update(s["status"] for s in row["samples"])
        answered = row["majority_answer"] is not None
        agreement[f"{row['agreement']:.2f}" if answered else "none"] += 1
        agreement_sum += row["agreement"]
        correct += bool(row["teacher_correct"])
        no_positive += not row["positives"]
        positives += len(row["positives"])
        negatives += len(row["negatives"])

    def share(x: int) -> float:
        return x / n if n else 0.0

    return {
        "examples": n,
        "samples": samples,
        "status_counts": dict(statuses),
        "parse_failures": statuses["no_answer"] + statuses["empty"],
        "request_failures": statuses["request_error"],
        "agreement_histogram": dict(sorted(agreement.items(), reverse=True)),
        "mean_agreement": share(agreement_sum) if n else 0.0,
        "teacher_accuracy": share(correct),
        "examples_without_positive": no_positive,
        "no_positive_share": share(no_positive),
        "positives_per_example": share(positives),
        "negatives_per_example": share(negatives),
    }


def format_table(summary: Mapping) -> str:
    """The summary as an aligned two-column table for the terminal."""
    lines = [
        ("examples", f"{summary['examples']}"),
        ("samples", f"{summary['samples']}"),
        ("parse failures (no answer / empty)", f"{summary['parse_failures']}"),
        ("request failures", f"{summary['request_failures']}"),
        ("teacher accuracy vs gold", f"{summary['teacher_accuracy']:.1%}"),
        ("mean agreement", f"{summary['mean_agreement']:.3f}"),
        ("examples without a positive", f"{summary['examples_without_positive']} ({summary['no_positive_share']:.1%})"),
        ("positives per example", f"{summary['positives_per_example']:.2f}"),
        ("negatives per example", f"{summary['negatives_per_example']:.2f}"),
    ]
    lines += [(f"agreement {key}", f"{count}") for key, count in summary["agreement_histogram"].items()]
    for key in ("rejected_rows", "shards"):
        if key in summary:
            lines.append((key.replace("_", " "), f"{summary[key]}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
