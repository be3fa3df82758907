"""Run statistics of a teacher output (pure): what a user checks before training on it."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

from qcrd_ray.data import answers
from qcrd_ray.teacher.samples import SAMPLE_STATUSES


class SourceStats:
    """Per-source counts over the samples of every row: how each teacher of a mix did (``teacher.sources``)."""

    def __init__(self, sources: Sequence, task):
        self.sources, self.task = sources, task
        self.of_index = {i: s.name for s in sources for i in s.indices}
        self.counts = {s.name: Counter() for s in sources}

    def add(self, row: Mapping) -> None:
        choices = tuple(row.get("choices") or ())
        majority = row["majority_answer"]
        majority_key = answers.answer_key(self.task, majority, choices) if majority is not None else None
        first_writer: dict[str, str] = {}  # rationale -> source of its first sample (positives are distinct texts)
        for s in sorted(row["samples"], key=lambda s: s["index"]):
            c = self.counts[self.of_index[s["index"]]]
            c["samples"] += 1
            first_writer.setdefault((s["rationale"] or "").strip(), self.of_index[s["index"]])
            key = answers.answer_key(self.task, s["answer"], choices) if s["status"] == "ok" and s["answer"] else None
            if key is None:
                c["failed"] += s["status"] != "ok"
                continue
            c["answered"] += 1
            c["gold"] += answers.is_correct(self.task, s["answer"], row["label"], choices)
            c["majority"] += key == majority_key
        for text in row["positives"]:
            if text.strip() in first_writer:
                self.counts[first_writer[text.strip()]]["positives"] += 1

    def result(self) -> list[dict]:
        positives = sum(c["positives"] for c in self.counts.values())

        def share(x: int, of: int) -> float:
            return x / of if of else 0.0

        return [{"name": s.name, "backend": s.backend.name, "weight": s.weight, "samples_per_question": len(s.indices),
                 "samples": (c := self.counts[s.name])["samples"],
                 "agreement_with_gold": share(c["gold"], c["answered"]),
                 "agreement_with_majority": share(c["majority"], c["answered"]),
                 "error_rate": share(c["failed"], c["samples"]),
                 "positive_share": share(c["positives"], positives)}
                for s in self.sources]


def summarize(rows: Iterable[Mapping], by_source: tuple[Sequence, object] | None = None) -> dict:
    """``rows``: TEACHER_SCHEMA dicts. Agreement histogram keys are the agreement rounded to 2 decimals
    ("none" where no sample gave an answer); shares and means are over examples.

    ``by_source``: ``(sources, task)`` (`teacher.sources.Source` list, the run's TaskSpec) adds ``sources``, one
    entry per source: its agreement with gold and with the (union's) majority over its answered samples, its error
    rate (samples without a usable answer: failed request, no answer, empty), and its share of the positives (a
    positive is credited to the source of the first sample that wrote it)."""
    n = samples = correct = no_positive = positives = negatives = 0
    statuses: Counter = Counter({s: 0 for s in SAMPLE_STATUSES})
    agreement: Counter = Counter()
    agreement_sum = 0.0
    per_source = SourceStats(*by_source) if by_source else None
    for row in rows:
        n += 1
        if per_source:
            per_source.add(row)
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
        **({"sources": per_source.result()} if per_source else {}),
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
    for src in summary.get("sources") or ():
        lines.append((f"source {src['name']} ({src['backend']}, {src['samples_per_question']} of K)",
                      f"gold {src['agreement_with_gold']:.1%}, majority {src['agreement_with_majority']:.1%}, "
                      f"errors {src['error_rate']:.1%}, positives {src['positive_share']:.1%}"))
    for key in ("rejected_rows", "shards"):
        if key in summary:
            lines.append((key.replace("_", " "), f"{summary[key]}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
