"""The teacher backend interface.

A backend is a Ray Data callable class: constructed once per actor with the run's config, then called on
batches of *sample rows* (one row per example and sample index; see `teacher.samples`). It returns the batch
with two more columns: ``text`` (the raw teacher output, "" when there is none) and ``error`` (why there is no
output, "" when there is one). A backend never raises for one bad row or request: it records the reason.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import pyarrow as pa

from qcrd_ray.config import Config

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
        rows = batch.to_pylist()
        try:
            completions = self.complete(rows)
            if len(completions) != len(rows):
                raise RuntimeError(f"backend returned {len(completions)} completions for {len(rows)} rows")
        except Exception as e:  # a broken batch is recorded on its rows, never fatal to the job
            log.exception("teacher backend %s failed on a batch of %d rows", type(self).__name__, len(rows))
            completions = [Completion(error=f"{type(e).__name__}: {e}")] * len(rows)
        return batch.append_column("text", pa.array([c.text for c in completions], pa.string())).append_column(
            "error", pa.array([c.error for c in completions], pa.string())
        )
