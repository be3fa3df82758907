"""Replays the rationales recorded in the dataset (DSS ``llm/`` files: greedy PaLM-540B chain of thought).

One recorded rationale per example, so K = 1 (config validation enforces it). The text is a raw CoT string,
parsed by `prompts.parse_recorded_cot` (which cuts the next few-shot exemplar). An example without a recorded
rationale gets an empty sample (status ``empty``), never a crash.
"""

from __future__ import annotations

from qcrd_ray.teacher.backends.base import Completion, TeacherBackend


class RecordedBackend(TeacherBackend):
    output_format = "recorded"
    needs_prompt = False

    def complete(self, rows: list[dict]) -> list[Completion]:
        out = []
        for row in rows:
            recorded = row.get("rationales") or []
            i = row["sample_index"]
            out.append(Completion(text=recorded[i] if i < len(recorded) else ""))
        return out
