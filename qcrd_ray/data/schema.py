"""Arrow schemas of the rows that flow between stages (see docs/design.md, "Rows")."""

from __future__ import annotations

import pyarrow as pa

# One example: what the loaders produce and every later stage reads.
EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("choices", pa.list_(pa.string()), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("rationales", pa.list_(pa.string()), nullable=False),
    ]
)

SAMPLE_TYPE = pa.struct(
    [
        pa.field("index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("rationale", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("status", pa.string()),  # ok | no_answer | empty | request_error
        pa.field("error", pa.string()),
    ]
)

# One example after the teacher stage (`qcrd teach` Parquet shards): the example columns without `rationales`,
# plus the self-consistency split of the K samples.
TEACHER_SCHEMA = pa.schema(
    [f for f in EXAMPLE_SCHEMA if f.name != "rationales"]
    + [
        pa.field("positives", pa.list_(pa.string()), nullable=False),
        pa.field("negatives", pa.list_(pa.string()), nullable=False),
        pa.field("majority_answer", pa.string(), nullable=True),
        pa.field("agreement", pa.float64(), nullable=False),
        pa.field("teacher_correct", pa.bool_(), nullable=False),
        pa.field("samples", pa.list_(SAMPLE_TYPE), nullable=False),
    ]
)

EXAMPLE_COLUMNS = tuple(EXAMPLE_SCHEMA.names)


def examples_table(rows: list[dict]) -> pa.Table:
    """Example dicts -> an Arrow table in EXAMPLE_SCHEMA (missing list columns become empty lists)."""
    cols = {name: [r.get(name) for r in rows] for name in EXAMPLE_COLUMNS}
    for name in ("choices", "rationales"):
        cols[name] = [list(v or []) for v in cols[name]]
    return pa.table(cols, schema=EXAMPLE_SCHEMA)
