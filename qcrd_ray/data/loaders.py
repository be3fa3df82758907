"""Loading one split of a task into example rows (EXAMPLE_SCHEMA dicts), with every bad row recorded.

Sources: ``data.data_dir`` unset: the built-in synthetic task (:mod:`qcrd_ray.data.synthetic`); else the entry of
``data.format`` in the format registry (:mod:`qcrd_ray.data.formats`: ``dss``, ``jsonl``, ``parquet``, ``hf``)
locates the split, reads its records and builds each row's fields; the checks below are the same for every format.

Where a dataset has no ``valid`` file (svamp and cqa in DSS), ``valid`` is ``valid_fraction`` of the train rows
chosen with ``split_seed`` and ``train`` excludes them. Carved rows keep their train ids (``svamp-train-17``).

A bad row never aborts a load: it is returned in ``LoadResult.rejects`` (and written to ``rejects_path``) with its
line or index, a reason and the raw text, and counted in the summary. A CoT file whose length does not match the
rows it covers cannot be joined safely, so every row of its range is rejected (``cot_mismatch``); a missing CoT
file rejects its range (``cot_missing``); a split with no CoT files at all loads with empty rationales.

Text is decoded strictly per row: a JSONL line (or a DSS split line) whose bytes are not UTF-8, a Parquet row with
such a value, or a row whose JSON escapes hold a lone surrogate is rejected (``not_utf8``), never loaded with
U+FFFD. A CoT file is one JSON array: it is decoded with its bad bytes kept apart, so only the rows whose
rationale holds them are rejected (``not_utf8``); bad bytes in the array's structure make it unparsable
(``cot_mismatch`` for its range). Ids are unique per source file: a later row repeating an id (given or generated)
is rejected (``duplicate_id``), the first row with it is kept; the check runs over the whole file in file order
before valid is carved, so train and the carved valid never share an id either.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import pyarrow as pa

from qcrd_ray.config import DataConfig
from qcrd_ray.data import synthetic
from qcrd_ray.data.formats import DataError, Format, NotUtf8, Reject, get_format, has_lone_surrogate
from qcrd_ray.data.schema import examples_table
from qcrd_ray.data.tasks import TaskSpec, cqa_input, get_task, nli_input

log = logging.getLogger(__name__)

RAW_CHARS = 500  # how much of a rejected row's raw text the rejects file keeps

# DataError and the input formatters stay importable from here (loaders.cqa_input, as before the format registry)
__all__ = ["DataError", "LoadResult", "cqa_input", "load_split", "nli_input"]


@dataclass
class LoadResult:
    task: str
    split: str
    rows: list[dict]
    rejects: list[dict] = field(default_factory=list)  # {line | index, source, kind, reason, raw}
    summary: dict = field(default_factory=dict)

    def table(self) -> pa.Table:
        return examples_table(self.rows)


def _carve(n: int, fraction: float, seed: int) -> set[int]:
    """The row indices of the carved validation split (a fixed-seed sample of round(n * fraction) rows)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: round(n * fraction)])


LABEL_DISTRIBUTION_TOP = 20


def _label_key(spec: TaskSpec, row: dict) -> str:
    """What the label distribution counts: the operators an equation uses (numeric tasks: every equation is
    distinct), the answer's position (tasks whose choices differ per row, such as CQA), else the label."""
    label = row["label"]
    if spec.answer_type == "numeric":
        return "".join(sorted(set(re.findall(r"(?<=[\d)])\s*([-+*/])", label)))) or "number"
    if row["choices"] and not spec.labels and label in row["choices"]:
        return f"({chr(ord('a') + row['choices'].index(label))})"
    return label


def _label_distribution(spec: TaskSpec, rows: list[dict]) -> dict[str, int]:
    counts = Counter(_label_key(spec, r) for r in rows)
    top = dict(counts.most_common(LABEL_DISTRIBUTION_TOP))
    if len(counts) > len(top):
        top["(other)"] = sum(counts.values()) - sum(top.values())
    return top


def _read_rows(cfg: DataConfig, spec: TaskSpec, split: str) -> tuple[list[dict], list[dict], PurePath, bool]:
    """Rows and rejects of one split read from files: ``(rows, rejects, source file, valid carved)``."""
    fmt = get_format(cfg.format)
    build = fmt.builder(spec, cfg)
    located = fmt.locate(cfg, split)
    source, carved = located.source, located.carved
    records = list(fmt.read(located))
    source_split = "train" if carved else split
    keep: set[int] | range = range(len(records))
    if carved:
        keep = _carve(len(records), cfg.valid_fraction, cfg.split_seed)
    elif split == "train" and _valid_is_carved(cfg, fmt):
        held_out = _carve(len(records), cfg.valid_fraction, cfg.split_seed)
        keep = set(keep) - held_out
    cots, bad_cots, rejects = {}, {}, []
    if fmt.rationales is not None:
        cots, bad_cots, rejects = fmt.rationales(cfg, located, source_split, len(records))
    position = fmt.position
    rows = []
    first_with_id: dict[str, int] = {}
    # Every row of the file, in file order, so "the first row with an id" does not depend on the split carved.
    for index, (number, line, record) in enumerate(records):
        try:
            if isinstance(record, NotUtf8):
                raise Reject("not_utf8", record.reason)
            if isinstance(record, json.JSONDecodeError):
                raise Reject("bad_json", f"not valid JSON: {record.msg} (column {record.colno})")
            if not isinstance(record, dict):
                raise Reject("bad_json", f"expected a JSON object, got {type(record).__name__}")
            if has_lone_surrogate(record):
                raise Reject("not_utf8", "holds an escaped lone surrogate (\\ud800-\\udfff): not encodable as UTF-8")
            row = build(record)
            if index in bad_cots:
                raise Reject(*bad_cots[index])
            row["id"] = row.get("id") or f"{cfg.task}-{source_split}-{index}"
            if row["id"] in first_with_id:
                raise Reject("duplicate_id", f"id {row['id']!r} repeats {position} "
                                              f"{records[first_with_id[row['id']]][0]} (the first is kept)"[:200])
            first_with_id[row["id"]] = index
        except Reject as r:
            if index in keep:
                raw = line or (json.dumps(record, default=str, ensure_ascii=False) if isinstance(record, dict) else "")
                rejects.append({position: number, "source": source.name, "kind": r.kind, "reason": r.reason,
                                "raw": raw[:RAW_CHARS]})
            continue
        if index not in keep:
            continue
        row["task"] = cfg.task
        row["rationales"] = [cots[index]] if index in cots else row.get("rationales", [])
        rows.append(row)
    return rows, rejects, source, carved


def load_split(cfg: DataConfig, split: str, rejects_path: str | Path | None = None) -> LoadResult:
    """Load one split (``train``, ``valid``, ``test``) of the configured task. See the module docstring."""
    spec = get_task(cfg.task, cfg.answer_type)
    if cfg.data_dir is None:
        if cfg.task != "synthetic":
            raise DataError(f"task {cfg.task!r} needs data.data_dir (only the synthetic task is built in)")
        rows = synthetic.make_split(split, train_size=cfg.synthetic_train_size, eval_size=cfg.synthetic_eval_size,
                                    seed=cfg.synthetic_seed, steps=cfg.synthetic_steps,
                                    max_operand=cfg.synthetic_max_operand, version=cfg.synthetic_version)
        rejects, source, carved = [], None, False
    else:
        rows, rejects, source, carved = _read_rows(cfg, spec, split)
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if rejects_path is not None:
        _write_jsonl(Path(rejects_path), rejects)
    if rejects:
        log.warning("%s %s: %d rows rejected (%s)", cfg.task, split, len(rejects),
                    ", ".join(f"{k}: {n}" for k, n in Counter(r["kind"] for r in rejects).items()))
    summary = {
        "task": cfg.task,
        "split": split,
        "source": str(source) if source else "built-in synthetic",
        "valid_carved_from_train": carved,
        "rows": len(rows),
        "rejected": len(rejects),
        "rejects_by_kind": dict(Counter(r["kind"] for r in rejects)),
        "with_rationale": sum(1 for r in rows if r["rationales"]),
        "label_distribution": _label_distribution(spec, rows),
    }
    return LoadResult(cfg.task, split, rows, rejects, summary)


def _valid_is_carved(cfg: DataConfig, fmt: Format) -> bool:
    """Whether this dataset has no valid file, so valid is carved from train (and train excludes it)."""
    try:
        return fmt.locate(cfg, "valid").carved
    except DataError:
        return False


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
