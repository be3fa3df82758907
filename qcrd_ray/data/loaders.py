"""Loading one split of a task into example rows (EXAMPLE_SCHEMA dicts), with every bad row recorded.

Sources:
- ``data.data_dir`` unset: the built-in synthetic task (:mod:`qcrd_ray.data.synthetic`).
- ``format: dss`` (svamp, cqa, anli1, esnli): ``<data_dir>/<task>/<task>_<split>.json`` (JSON Lines) and the
  recorded PaLM rationales ``<data_dir>/<task>/llm/<split>_CoT_<i>.json`` (JSON arrays; line k of file i belongs to
  row ``i * B + k``, B from :data:`COT_BATCH`).
- ``format: jsonl | parquet`` (user tasks): ``data_dir`` is a file (its train split) or a folder holding
  ``<split>.jsonl`` / ``<split>.parquet`` (or ``<task>_<split>.*``); ``data.columns`` maps our column names
  (id, input, label, choices, rationale/rationales) to the file's.
- ``format: hf`` (user tasks): ``data_dir`` is a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder,
  local data files (a file: its train split; a folder: split by file name, as ``load_dataset`` does), or a hub
  name (online). Our ``valid`` is its ``validation`` (or ``valid``, ``dev``) split; ``data.columns`` as above.

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
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Iterator

import pyarrow as pa

from qcrd_ray.config import DataConfig
from qcrd_ray.data import synthetic
from qcrd_ray.data.answers import numeric_value
from qcrd_ray.data.schema import examples_table
from qcrd_ray.data.tasks import NLI_LABELS, TaskSpec, cqa_input, get_task, nli_input

log = logging.getLogger(__name__)

COT_BATCH = {"svamp": 500, "cqa": 1000, "anli1": 5000, "esnli": 5500}
RAW_CHARS = 500  # how much of a rejected row's raw text the rejects file keeps


class DataError(ValueError):
    """A split cannot be loaded at all (missing file, unknown task or format)."""


@dataclass
class LoadResult:
    task: str
    split: str
    rows: list[dict]
    rejects: list[dict] = field(default_factory=list)  # {line | index, source, kind, reason, raw}
    summary: dict = field(default_factory=dict)

    def table(self) -> pa.Table:
        return examples_table(self.rows)


class _NotUtf8:
    """A record whose bytes are not UTF-8 (``reason`` says where)."""

    def __init__(self, reason: str):
        self.reason = reason


def _utf8_error(error: UnicodeDecodeError) -> str:
    return f"not UTF-8: byte 0x{error.object[error.start]:02x} at byte {error.start}"


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds text that cannot be encoded as UTF-8 (an escaped lone surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class _Reject(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# --------------------------------------------------------------------------------------------------------------
# per-task row builders: raw record -> example fields (raise _Reject on a bad row)


def _field(raw: dict, name: str, kind: type = str) -> Any:
    if name not in raw or raw[name] is None:
        raise _Reject("missing_field", f"missing field {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise _Reject("bad_field", f"field {name!r} must be a non-empty {kind.__name__}, got {value!r}"[:200])
    return value


def _numeric_label(label: str) -> str:
    if numeric_value(label) is None:
        raise _Reject("bad_label", f"label {label!r} is not an arithmetic equation or number"[:200])
    return label


def _svamp(raw: dict) -> dict:
    return {"input": _field(raw, "input"), "choices": [], "label": _numeric_label(_field(raw, "label"))}


def _checked_choices(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c.strip() for c in choices):
        raise _Reject("bad_field", f"choices must be a non-empty list of strings, got {choices!r}"[:200])
    if len(choices) > 26:
        raise _Reject("bad_field", f"{len(choices)} choices; at most 26 (a-z)")
    return choices


def _cqa(raw: dict) -> dict:
    question, answer = _field(raw, "question"), _field(raw, "answer")
    choices = _checked_choices(_field(raw, "choices", list))
    if answer not in choices:
        raise _Reject("label_not_in_choices", f"answer {answer!r} is not among the choices {choices}"[:200])
    return {"id": raw.get("id"), "input": cqa_input(question, choices), "choices": choices, "label": answer}


def _nli_label(label: Any) -> str:
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(NLI_LABELS):
        return NLI_LABELS[label]
    if isinstance(label, str) and label.strip().lower() in NLI_LABELS:
        return label.strip().lower()
    raise _Reject("label_not_in_choices", f"label {label!r} is not 0/1/2 or one of {', '.join(NLI_LABELS)}")


def _nli(raw: dict) -> dict:
    premise, hypothesis = _field(raw, "premise"), _field(raw, "hypothesis")
    if "label" not in raw:
        raise _Reject("missing_field", "missing field 'label'")
    return {
        "id": raw.get("uid"),
        "input": nli_input(premise, hypothesis),
        "choices": list(NLI_LABELS),
        "label": _nli_label(raw["label"]),
    }


_DSS_BUILDERS = {"svamp": _svamp, "cqa": _cqa, "anli1": _nli, "esnli": _nli}


def _user_builder(spec: TaskSpec, columns: dict):
    col = {name: columns.get(name, name) for name in ("id", "input", "label", "choices")}
    rationale_cols = [columns[k] for k in ("rationales", "rationale") if k in columns] or ["rationales", "rationale"]

    def build(raw: dict) -> dict:
        text = _field(raw, col["input"])
        choices = _checked_choices(raw[col["choices"]]) if raw.get(col["choices"]) is not None else []
        if col["label"] not in raw or raw[col["label"]] is None:
            raise _Reject("missing_field", f"missing field {col['label']!r}")
        label = raw[col["label"]]
        if isinstance(label, int) and not isinstance(label, bool) and choices:
            if not 0 <= label < len(choices):
                raise _Reject("label_not_in_choices", f"label index {label} out of range for {len(choices)} choices")
            label = choices[label]
        label = str(label).strip()
        if not label:
            raise _Reject("bad_field", f"field {col['label']!r} is empty")
        if choices and label not in choices:
            raise _Reject("label_not_in_choices", f"label {label!r} is not among the choices {choices}"[:200])
        if spec.answer_type == "numeric":
            _numeric_label(label)
        rationales: list[str] = []
        for name in rationale_cols:
            value = raw.get(name)
            if value is None:
                continue
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise _Reject("bad_field", f"field {name!r} must be a string or a list of strings")
            rationales.extend(values)
        row_id = raw.get(col["id"])
        return {"id": None if row_id is None else str(row_id), "input": text, "choices": choices, "label": label,
                "rationales": rationales}

    return build


# --------------------------------------------------------------------------------------------------------------
# reading records


def _jsonl_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(1-based line number, raw line, parsed object, the JSON error or :class:`_NotUtf8`) for every non-blank
    line; each line is decoded on its own, so one bad line does not touch the others."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n"), _NotUtf8(_utf8_error(e))
                continue
            if not line.strip():
                continue
            try:
                yield number, line.rstrip("\n"), json.loads(line)
            except json.JSONDecodeError as e:
                yield number, line.rstrip("\n"), e


def _parquet_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(0-based row index, "", record or :class:`_NotUtf8`) for every row. Parquet strings should be UTF-8 but
    the format does not enforce it; a value that is not fails its row only."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    try:
        records: list[Any] = table.to_pylist()
    except UnicodeDecodeError:
        records = [{} for _ in range(table.num_rows)]
        for name, column in zip(table.column_names, table.columns):
            for index, value in enumerate(column):
                if isinstance(records[index], _NotUtf8):
                    continue
                try:
                    records[index][name] = value.as_py()
                except UnicodeDecodeError as e:
                    records[index] = _NotUtf8(f"column {name!r} is {_utf8_error(e)}")
    yield from ((index, "", record) for index, record in enumerate(records))


def _load_cots(task_dir: Path, split: str, batch: int, n_rows: int) -> tuple[dict[int, str], dict[int, tuple[str, str]], list[dict]]:
    """Recorded rationales by row index, the rows that cannot get one (index -> (kind, reason)), and file-level
    rejects (a CoT file with no rows)."""
    pattern = re.compile(rf"^{re.escape(split)}_CoT_(\d+)\.json$")
    llm_dir = task_dir / "llm"
    files = {}
    if llm_dir.is_dir():
        files = {int(m.group(1)): p for p in llm_dir.iterdir() if (m := pattern.match(p.name))}
    cots: dict[int, str] = {}
    bad: dict[int, tuple[str, str]] = {}
    file_rejects: list[dict] = []
    if not files:
        return cots, bad, file_rejects
    n_files = -(-n_rows // batch)
    for i in range(max(n_files, max(files) + 1)):
        lo, hi = i * batch, min((i + 1) * batch, n_rows)
        name = f"llm/{split}_CoT_{i}.json"
        if i >= n_files:
            file_rejects.append({"source": name, "kind": "cot_mismatch", "reason": f"{name} has no rows to join "
                                 f"({n_rows} rows, {batch} per file)", "raw": ""})
            continue
        if i not in files:
            bad.update({k: ("cot_missing", f"{name} is missing") for k in range(lo, hi)})
            continue
        try:
            # bad bytes become lone surrogates, so the rows whose rationale holds them can be told apart below
            texts = json.loads(files[i].read_bytes().decode("utf-8", errors="surrogateescape"))
            if not isinstance(texts, list):
                raise ValueError("not a JSON array")
        except ValueError as e:
            bad.update({k: ("cot_mismatch", f"{name} is not a JSON array of strings: {e}"[:200]) for k in range(lo, hi)})
            continue
        if len(texts) != hi - lo:
            reason = f"CoT count mismatch: {name} has {len(texts)} rationales for rows {lo}..{hi - 1} ({hi - lo} rows)"
            bad.update({k: ("cot_mismatch", reason) for k in range(lo, hi)})
            continue
        for k, text in enumerate(texts):
            if isinstance(text, str) and _has_lone_surrogate(text):
                bad[lo + k] = ("not_utf8", f"{name}[{k}] is not UTF-8 text")
            elif isinstance(text, str):
                cots[lo + k] = text
            else:
                bad[lo + k] = ("cot_mismatch", f"{name}[{k}] is not a string: {text!r}"[:200])
    return cots, bad, file_rejects


def _carve(n: int, fraction: float, seed: int) -> set[int]:
    """The row indices of the carved validation split (a fixed-seed sample of round(n * fraction) rows)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: round(n * fraction)])


# --------------------------------------------------------------------------------------------------------------


def _dss_paths(cfg: DataConfig, split: str) -> tuple[Path, Path, Path | None]:
    """(task folder, the split file to read, the train file when valid must be carved from it)."""
    root = Path(cfg.data_dir)
    task_dir = root / cfg.task if (root / cfg.task).is_dir() else root
    split_file = task_dir / f"{cfg.task}_{split}.json"
    train_file = task_dir / f"{cfg.task}_train.json"
    if split_file.is_file():
        return task_dir, split_file, None
    if split == "valid" and train_file.is_file():
        return task_dir, train_file, train_file
    raise DataError(f"{cfg.task} {split}: {split_file} not found (expected the DSS layout "
                    f"<data_dir>/{cfg.task}/{cfg.task}_<split>.json)")


def _user_path(cfg: DataConfig, split: str) -> tuple[Path, bool]:
    """(the file of the split, whether valid is carved from it)."""
    root = Path(cfg.data_dir)
    ext = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}[cfg.format]
    if root.is_file():
        if split == "train":
            return root, False
        if split == "valid":
            return root, True
        raise DataError(f"{cfg.task} {split}: data.data_dir is a single file (the train split); put the splits in "
                        f"a folder as <split>{ext[0]} to load {split}")
    candidates = [root / f"{stem}{e}" for stem in (split, f"{cfg.task}_{split}") for e in ext]
    for path in candidates:
        if path.is_file():
            return path, False
    if split == "valid":
        return _user_path(cfg, "train")[0], True
    raise DataError(f"{cfg.task} {split}: none of {', '.join(str(p) for p in candidates)} exists")


# format hf: our split -> the names a Hugging Face dataset may give it, in the order tried
HF_SPLITS = {"train": ("train",), "valid": ("valid", "validation", "dev"), "test": ("test",)}
# format hf, a single local data file: the datasets builder that reads it
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _hf_dataset(location: str):
    """The DatasetDict at ``location`` (see the module docstring); DataError when it cannot be read."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("data.format hf needs the datasets package: pip install datasets") from e
    root = Path(location)
    try:
        if root.is_dir() and any((root / f).is_file() for f in ("dataset_dict.json", "state.json")):
            found = datasets.load_from_disk(str(root))
        elif root.is_file():
            if root.suffix not in HF_BUILDERS:
                raise DataError(f"data.data_dir={location}: format hf reads {', '.join(HF_BUILDERS)} files")
            found = datasets.load_dataset(HF_BUILDERS[root.suffix], data_files={"train": str(root)})
        else:  # a folder of data files, or a hub name
            found = datasets.load_dataset(location)
    except (OSError, ValueError) as e:  # datasets' not-found errors are FileNotFoundError
        if isinstance(e, DataError):
            raise
        raise DataError(f"data.data_dir={location}: not a readable Hugging Face dataset ({type(e).__name__}: "
                        f"{e})"[:500]) from e
    return found if isinstance(found, datasets.DatasetDict) else datasets.DatasetDict({"train": found})


def _hf_split(cfg: DataConfig, split: str) -> tuple[Any, str, bool]:
    """(the dataset split to read, its name, whether valid is carved from it)."""
    found = _hf_dataset(cfg.data_dir)
    for name in HF_SPLITS.get(split, (split,)):
        if name in found:
            return found[name], name, False
    if split == "valid" and "train" in found:
        return found["train"], "train", True
    raise DataError(f"{cfg.task} {split}: the dataset at {cfg.data_dir} has splits {', '.join(found)}, none of "
                    f"{', '.join(HF_SPLITS.get(split, (split,)))}")


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
    if cfg.format == "dss":
        if cfg.task not in _DSS_BUILDERS:
            raise DataError(f"format dss reads {', '.join(_DSS_BUILDERS)}; for task {cfg.task!r} use "
                            f"data.format=jsonl, parquet or hf with data.columns")
        task_dir, source, carve_from = _dss_paths(cfg, split)
        carved, build = carve_from is not None, _DSS_BUILDERS[cfg.task]
        records = list(_jsonl_records(source))
    elif cfg.format == "hf":
        dataset, name, carved = _hf_split(cfg, split)
        source = PurePosixPath(f"{cfg.data_dir}:{name}")  # a rejected row names the dataset and split it came from
        build = _user_builder(spec, cfg.columns)
        records = [(index, "", record) for index, record in enumerate(dataset.to_list())]
    else:
        source, carved = _user_path(cfg, split)
        build = _user_builder(spec, cfg.columns)
        records = list((_parquet_records if cfg.format == "parquet" else _jsonl_records)(source))
    source_split = "train" if carved else split
    keep: set[int] | range = range(len(records))
    if carved:
        keep = _carve(len(records), cfg.valid_fraction, cfg.split_seed)
    elif split == "train" and _valid_is_carved(cfg):
        held_out = _carve(len(records), cfg.valid_fraction, cfg.split_seed)
        keep = set(keep) - held_out
    cots, bad_cots, rejects = {}, {}, []
    if cfg.format == "dss":
        cots, bad_cots, rejects = _load_cots(task_dir, source_split, COT_BATCH[cfg.task], len(records))
    position = "index" if cfg.format in ("parquet", "hf") else "line"
    rows = []
    first_with_id: dict[str, int] = {}
    # Every row of the file, in file order, so "the first row with an id" does not depend on the split carved.
    for index, (number, line, record) in enumerate(records):
        try:
            if isinstance(record, _NotUtf8):
                raise _Reject("not_utf8", record.reason)
            if isinstance(record, json.JSONDecodeError):
                raise _Reject("bad_json", f"not valid JSON: {record.msg} (column {record.colno})")
            if not isinstance(record, dict):
                raise _Reject("bad_json", f"expected a JSON object, got {type(record).__name__}")
            if _has_lone_surrogate(record):
                raise _Reject("not_utf8", "holds an escaped lone surrogate (\\ud800-\\udfff): not encodable as UTF-8")
            row = build(record)
            if index in bad_cots:
                raise _Reject(*bad_cots[index])
            row["id"] = row.get("id") or f"{cfg.task}-{source_split}-{index}"
            if row["id"] in first_with_id:
                raise _Reject("duplicate_id", f"id {row['id']!r} repeats {position} "
                                              f"{records[first_with_id[row['id']]][0]} (the first is kept)"[:200])
            first_with_id[row["id"]] = index
        except _Reject as r:
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


def _valid_is_carved(cfg: DataConfig) -> bool:
    """Whether this dataset has no valid file, so valid is carved from train (and train excludes it)."""
    try:
        if cfg.format == "dss":
            return _dss_paths(cfg, "valid")[2] is not None
        if cfg.format == "hf":
            return _hf_split(cfg, "valid")[2]
        return _user_path(cfg, "valid")[1]
    except DataError:
        return False


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
