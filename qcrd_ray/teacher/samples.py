"""Sample rows: each example duplicated K times with its own sample index and seed, and the parse of each
teacher output. Pure functions on Arrow tables (no Ray), used as Ray Data `map_batches` steps.

`ray.data.llm` returns one completion per row, so K samples per question means K rows per question.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

SAMPLE_STATUSES = ("ok", "no_answer", "empty", "request_error")


def sample_seed(teacher_seed: int, example_id: str, index: int) -> int:
    """A per-sample seed that depends only on (teacher seed, example id, sample index), so a sample is the same
    whichever batch, actor or rerun produces it (what makes resumed runs equal uninterrupted ones)."""
    digest = hashlib.blake2b(f"{teacher_seed}\x00{example_id}\x00{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def expand_samples(batch: pa.Table, k: int, teacher_seed: int, prompt_fn=None, indices=None) -> pa.Table:
    """Repeat each example row once per sample index (rows of one example stay adjacent) and add ``sample_index``,
    ``source_index`` (the sample's place among ``indices``), ``seed`` and ``prompt`` (``prompt_fn(row)``, or ""
    where the backend needs none). ``indices``: the sample indices to make, default 0..k-1 (a teacher source makes
    only its own; see `teacher.sources`)."""
    indices = list(range(k)) if indices is None else list(indices)
    n, m = batch.num_rows, len(indices)
    out = batch.take(pa.array([i for i in range(n) for _ in range(m)], pa.int64()))
    ids = batch.column("id").to_pylist()
    prompts = [prompt_fn(row) for row in batch.to_pylist()] if prompt_fn else [""] * n
    return (
        out.append_column("sample_index", pa.array([j for _ in range(n) for j in indices], pa.int32()))
        .append_column("source_index", pa.array([j for _ in range(n) for j in range(m)], pa.int32()))
        .append_column("seed", pa.array([sample_seed(teacher_seed, i, j) for i in ids for j in indices], pa.int64()))
        .append_column("prompt", pa.array([p for p in prompts for _ in range(m)], pa.string()))
    )


def parse_samples(batch: pa.Table, parse_fn, task) -> pa.Table:
    """Add ``rationale``, ``answer`` and ``status`` from the backend's ``text``/``error`` columns.

    ``parse_fn(task, text, choices)`` is `prompts.parse_teacher_output` or `prompts.parse_recorded_cot`;
    ``task`` is the run's task name or `TaskSpec` (a user task's answer type comes from the config).
    A row with an ``error`` is a failed request (status ``request_error``) and is not parsed; an output the
    parser chokes on is a ``no_answer`` sample with the parser's error.
    """
    rationales, answers, statuses, errors = [], [], [], []
    for text, error, choices in zip(
        batch.column("text").to_pylist(),
        batch.column("error").to_pylist(),
        batch.column("choices").to_pylist(),
    ):
        if error:
            rationale, answer, status = "", None, "request_error"
        else:
            try:
                rationale, answer, status = parse_fn(task, text or "", tuple(choices or ()))
            except Exception as e:  # one odd output must not fail the batch: it is a sample without an answer
                rationale, answer, status = "", None, "no_answer"
                error = f"parse failed: {type(e).__name__}: {e}"
        rationales.append(rationale or "")
        answers.append(answer)
        statuses.append(status)
        errors.append(error or "")
    return (
        batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        .append_column("rationale", pa.array(rationales, pa.string()))
        .append_column("answer", pa.array(answers, pa.string()))
        .append_column("status", pa.array(statuses, pa.string()))
    )
