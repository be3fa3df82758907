"""Replays the rationales recorded in the dataset (DSS ``llm/`` files: greedy PaLM-540B chain of thought).

One recorded rationale per example, so it draws one sample per question (its registry entry's ``fixed_k``, which
config validation enforces; in a mix of teacher sources, one of the K). The text is a raw CoT string,
parsed by `prompts.parse_recorded_cot` (which cuts the next few-shot exemplar). An example without a recorded
rationale gets an empty sample (status ``empty``), never a crash.
"""

from __future__ import annotations

from qcrd_ray.teacher.backends.base import Completion, TeacherBackend


class RecordedBackend(TeacherBackend):
    def complete(self, rows: list[dict]) -> list[Completion]:
        out = []
        for row in rows:
            recorded = row.get("rationales") or []
            i = row["source_index"]  # its own samples count from 0, wherever they sit among the K
            out.append(Completion(text=recorded[i] if i < len(recorded) else ""))
        return out
