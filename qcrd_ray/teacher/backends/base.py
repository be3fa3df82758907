"""The teacher backend interface.

A backend is a Ray Data callable class: constructed once per actor with the run's config, then called on
batches of *sample rows* (one row per example and sample index; see `teacher.samples`). It returns the batch
with two more columns: ``text`` (the raw teacher output, "" when there is none) and ``error`` (why there is no
output, "" when there is one). A backend never raises for one bad row or request: it records the reason
(a row that crashes the backend is found by bisection and recorded too; see ``TeacherBackend.__call__``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import pyarrow as pa

from qcrd_ray.config import Config
from qcrd_ray.isolation import ResultCountError, isolate_failures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str = ""
    error: str = ""  # non-empty: the request failed (status request_error), with the reason


class TeacherBackend(ABC):
    # "teacher" = `<Explanation>: … <Answer>: …` output (prompts.parse_teacher_output);
    # "recorded" = a PaLM CoT string with a few-shot tail (prompts.parse_recorded_cot)
    output_format = "teacher"
    # whether the sample rows need the few-shot `prompt` column (rule-based and replay backends do not)
    needs_prompt = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def complete(self, rows: list[dict]) -> list[Completion]:
        """One completion per sample row, in order. Row keys: the example columns, ``sample_index``, ``seed``,
        ``prompt``."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with ``text`` and ``error``. A batch on which the backend raises (a crash, not a failed request,
        which ``complete`` records itself) is bisected: the rows that crash it alone are retried
        ``teacher.poison_retries`` times, then recorded with the exception as their error (errors.jsonl, by id);
        every other row gets its completion."""
        rows = batch.to_pylist()
        attempts = 1 + self.cfg.teacher.poison_retries
        try:
            results = isolate_failures(self.complete, rows, attempts=attempts)
        except ResultCountError as e:  # a backend bug: every row of the batch says so, the job goes on
            log.exception("teacher backend %s broke its contract on a batch of %d rows", type(self).__name__,
                          len(rows))
            results = [e] * len(rows)
        poisoned = [row["id"] for row, r in zip(rows, results) if isinstance(r, BaseException)]
        if poisoned:
            log.error("teacher backend %s crashed on %d of %d rows, alone, %d times each (ids %s): recorded as errors",
                      type(self).__name__, len(poisoned), len(rows), attempts, ", ".join(poisoned[:5]))
        completions = [Completion(error=f"backend crashed on this row ({attempts} attempts): {type(r).__name__}: {r}")
                       if isinstance(r, BaseException) else r for r in results]
        return batch.append_column("text", pa.array([c.text for c in completions], pa.string())).append_column(
            "error", pa.array([c.error for c in completions], pa.string())
        )
