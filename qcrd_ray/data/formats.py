"""Data formats: one registry entry each (`FORMATS`), the only place that says what a format is.

An entry owns everything that differs between formats: how a split's source is located (a file, a folder of split
files, a dataset's split) and whether valid is carved from train there, how records are read from it (each record
decoded on its own), how a record becomes an example's fields (the DSS layout: a builder per task; every other
format: the ``data.columns`` mapping), what a reject calls a record's place (``line`` or ``index``), and any join
of rationales kept beside the records (the DSS layout's recorded PaLM CoT files). ``data.format``'s choices and
help read the registry, and loaders.py asks the entry; nothing compares format names. A new format is one
`register_format` call (often a `Files` locator and a reader) and its test.

The formats:

- ``dss`` (svamp, cqa, anli1, esnli): ``<data_dir>/<task>/<task>_<split>.json`` (JSON Lines) and the recorded PaLM
  rationales ``<data_dir>/<task>/llm/<split>_CoT_<i>.json`` (JSON arrays; line k of file i belongs to row
  ``i * B + k``, B from :data:`COT_BATCH`).
- ``jsonl | parquet`` (user tasks): ``data_dir`` is a file (its train split) or a folder holding
  ``<split>.jsonl`` / ``<split>.parquet`` (or ``<task>_<split>.*``); ``data.columns`` maps our column names
  (id, input, label, choices, rationale/rationales) to the file's.
- ``hf`` (user tasks): ``data_dir`` is a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, local data
  files (a file: its train split; a folder: split by file name, as ``load_dataset`` does), or a hub name (online).
  Our ``valid`` is its ``validation`` (or ``valid``, ``dev``) split; ``data.columns`` as above.

This module stays light: config.py reads it for ``data.format``'s choices. pyarrow and ``datasets`` are imported
only inside the readers that need them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from qcrd_ray.data.answers import numeric_value
from qcrd_ray.data.tasks import NLI_LABELS, TaskSpec, cqa_input, nli_input

if TYPE_CHECKING:
    from qcrd_ray.config import DataConfig

COT_BATCH = {"svamp": 500, "cqa": 1000, "anli1": 5000, "esnli": 5500}

# A record as a format reads it: (its place: 1-based line or 0-based index, its raw text or "", the parsed object,
# or the json.JSONDecodeError / NotUtf8 that stands in for a record that could not be parsed)
Record = tuple[int, str, Any]


class DataError(ValueError):
    """A split cannot be loaded at all (missing file, unknown task or format)."""


class NotUtf8:
    """A record whose bytes are not UTF-8 (``reason`` says where)."""

    def __init__(self, reason: str):
        self.reason = reason


class Reject(Exception):
    """A row that cannot be loaded: ``kind`` (the rejects file's kind) and ``reason``."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _utf8_error(error: UnicodeDecodeError) -> str:
    return f"not UTF-8: byte 0x{error.object[error.start]:02x} at byte {error.start}"


def has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds text that cannot be encoded as UTF-8 (an escaped lone surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


# --------------------------------------------------------------------------------------------------------------
# row builders: raw record -> example fields (raise Reject on a bad row)


def _field(raw: dict, name: str, kind: type = str) -> Any:
    if name not in raw or raw[name] is None:
        raise Reject("missing_field", f"missing field {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise Reject("bad_field", f"field {name!r} must be a non-empty {kind.__name__}, got {value!r}"[:200])
    return value


def _numeric_label(label: str) -> str:
    if numeric_value(label) is None:
        raise Reject("bad_label", f"label {label!r} is not an arithmetic equation or number"[:200])
    return label


def _svamp(raw: dict) -> dict:
    return {"input": _field(raw, "input"), "choices": [], "label": _numeric_label(_field(raw, "label"))}


def _checked_choices(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c.strip() for c in choices):
        raise Reject("bad_field", f"choices must be a non-empty list of strings, got {choices!r}"[:200])
    if len(choices) > 26:
        raise Reject("bad_field", f"{len(choices)} choices; at most 26 (a-z)")
    return choices


def _cqa(raw: dict) -> dict:
    question, answer = _field(raw, "question"), _field(raw, "answer")
    choices = _checked_choices(_field(raw, "choices", list))
    if answer not in choices:
        raise Reject("label_not_in_choices", f"answer {answer!r} is not among the choices {choices}"[:200])
    return {"id": raw.get("id"), "input": cqa_input(question, choices), "choices": choices, "label": answer}


def _nli_label(label: Any) -> str:
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(NLI_LABELS):
        return NLI_LABELS[label]
    if isinstance(label, str) and label.strip().lower() in NLI_LABELS:
        return label.strip().lower()
    raise Reject("label_not_in_choices", f"label {label!r} is not 0/1/2 or one of {', '.join(NLI_LABELS)}")


def _nli(raw: dict) -> dict:
    premise, hypothesis = _field(raw, "premise"), _field(raw, "hypothesis")
    if "label" not in raw:
        raise Reject("missing_field", "missing field 'label'")
    return {
        "id": raw.get("uid"),
        "input": nli_input(premise, hypothesis),
        "choices": list(NLI_LABELS),
        "label": _nli_label(raw["label"]),
    }


_DSS_BUILDERS = {"svamp": _svamp, "cqa": _cqa, "anli1": _nli, "esnli": _nli}


def columns_builder(spec: TaskSpec, cfg: "DataConfig") -> Callable[[dict], dict]:
    """A user task's row builder: ``data.columns`` maps our column names to the record's."""
    columns = cfg.columns
    col = {name: columns.get(name, name) for name in ("id", "input", "label", "choices")}
    rationale_cols = [columns[k] for k in ("rationales", "rationale") if k in columns] or ["rationales", "rationale"]

    def build(raw: dict) -> dict:
        text = _field(raw, col["input"])
        choices = _checked_choices(raw[col["choices"]]) if raw.get(col["choices"]) is not None else []
        if col["label"] not in raw or raw[col["label"]] is None:
            raise Reject("missing_field", f"missing field {col['label']!r}")
        label = raw[col["label"]]
        if isinstance(label, int) and not isinstance(label, bool) and choices:
            if not 0 <= label < len(choices):
                raise Reject("label_not_in_choices", f"label index {label} out of range for {len(choices)} choices")
            label = choices[label]
        label = str(label).strip()
        if not label:
            raise Reject("bad_field", f"field {col['label']!r} is empty")
        if choices and label not in choices:
            raise Reject("label_not_in_choices", f"label {label!r} is not among the choices {choices}"[:200])
        if spec.answer_type == "numeric":
            _numeric_label(label)
        rationales: list[str] = []
        for name in rationale_cols:
            value = raw.get(name)
            if value is None:
                continue
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise Reject("bad_field", f"field {name!r} must be a string or a list of strings")
            rationales.extend(values)
        row_id = raw.get(col["id"])
        return {"id": None if row_id is None else str(row_id), "input": text, "choices": choices, "label": label,
                "rationales": rationales}

    return build


# --------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Located:
    """One split's source as a format found it. ``source`` names it (the summary's source; a reject's ``source`` is
    its name), ``carved``: valid is carved from it (it is the train split), ``data``: what the format's ``read``
    takes where that is not the file ``source`` (hf: the dataset split)."""

    source: PurePath
    carved: bool
    data: Any = None


@dataclass(frozen=True)
class Format:
    name: str
    help: str  # one line: what data.data_dir holds (data.format's help lists these)
    locate: Callable[["DataConfig", str], Located]  # (cfg, split) -> its source; DataError when there is none
    read: Callable[[Located], Iterable[Record]]  # every record of the source, in order
    # rows(spec, cfg) -> build(record) -> the example's fields (raises Reject on a bad row)
    rows: Callable[[TaskSpec, "DataConfig"], Callable[[dict], dict]] = columns_builder
    position: str = "line"  # what a reject calls a record's place: "line" (1-based) or "index" (0-based)
    tasks: tuple[str, ...] | None = None  # the tasks it reads (dss); None = any task, through data.columns
    # rationales(cfg, located, source split, rows in the source) -> (rationale by row index, the rows that cannot
    # get one: index -> (kind, reason), file-level rejects), for rationales kept beside the records (dss); None: a
    # record carries its own (data.columns)
    rationales: Callable[["DataConfig", Located, str, int], tuple[dict, dict, list]] | None = None

    def builder(self, spec: TaskSpec, cfg: "DataConfig") -> Callable[[dict], dict]:
        """The row builder for ``cfg.task``; DataError when this format cannot read that task."""
        if self.tasks is not None and cfg.task not in self.tasks:
            raise DataError(f"format {self.name} reads {', '.join(self.tasks)}; for task {cfg.task!r} use "
                            f"data.format={user_formats()} with data.columns")
        return self.rows(spec, cfg)


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add (or replace) a registry entry; returns it."""
    FORMATS[fmt.name] = fmt
    return fmt


def user_formats() -> str:
    """The formats that read any task through data.columns, as a sentence lists them: "jsonl, parquet or hf"."""
    names = [f.name for f in FORMATS.values() if f.tasks is None]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise DataError(f"data.format {name!r} is not a format; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


# --------------------------------------------------------------------------------------------------------------
# readers


def jsonl_records(path: Path) -> Iterator[Record]:
    """(1-based line number, raw line, parsed object, the JSON error or :class:`NotUtf8`) for every non-blank
    line; each line is decoded on its own, so one bad line does not touch the others."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n"), NotUtf8(_utf8_error(e))
                continue
            if not line.strip():
                continue
            try:
                yield number, line.rstrip("\n"), json.loads(line)
            except json.JSONDecodeError as e:
                yield number, line.rstrip("\n"), e


def parquet_records(path: Path) -> Iterator[Record]:
    """(0-based row index, "", record or :class:`NotUtf8`) for every row. Parquet strings should be UTF-8 but
    the format does not enforce it; a value that is not fails its row only."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    try:
        records: list[Any] = table.to_pylist()
    except UnicodeDecodeError:
        records = [{} for _ in range(table.num_rows)]
        for name, column in zip(table.column_names, table.columns):
            for index, value in enumerate(column):
                if isinstance(records[index], NotUtf8):
                    continue
                try:
                    records[index][name] = value.as_py()
                except UnicodeDecodeError as e:
                    records[index] = NotUtf8(f"column {name!r} is {_utf8_error(e)}")
    yield from ((index, "", record) for index, record in enumerate(records))


def _read_jsonl(located: Located) -> Iterator[Record]:
    return jsonl_records(Path(located.source))


def _read_parquet(located: Located) -> Iterator[Record]:
    return parquet_records(Path(located.source))


@dataclass(frozen=True)
class Files:
    """The ``locate`` of a format whose ``data_dir`` is one file (its train split) or a folder holding
    ``<split><ext>`` or ``<task>_<split><ext>`` for one of ``extensions`` (tried in order); valid is carved from
    train where there is no valid file."""

    extensions: tuple[str, ...]

    def __call__(self, cfg: "DataConfig", split: str) -> Located:
        root = Path(cfg.data_dir)
        if root.is_file():
            if split == "train":
                return Located(root, False)
            if split == "valid":
                return Located(root, True)
            raise DataError(f"{cfg.task} {split}: data.data_dir is a single file (the train split); put the splits "
                            f"in a folder as <split>{self.extensions[0]} to load {split}")
        candidates = [root / f"{stem}{e}" for stem in (split, f"{cfg.task}_{split}") for e in self.extensions]
        for path in candidates:
            if path.is_file():
                return Located(path, False)
        if split == "valid":
            return Located(self(cfg, "train").source, True)
        raise DataError(f"{cfg.task} {split}: none of {', '.join(str(p) for p in candidates)} exists")


# --------------------------------------------------------------------------------------------------------------
# dss: the DSS layout and its recorded CoT files


def _dss_locate(cfg: "DataConfig", split: str) -> Located:
    """The split file, or the train file (carved) for a valid split that has none."""
    root = Path(cfg.data_dir)
    task_dir = root / cfg.task if (root / cfg.task).is_dir() else root
    split_file = task_dir / f"{cfg.task}_{split}.json"
    train_file = task_dir / f"{cfg.task}_train.json"
    if split_file.is_file():
        return Located(split_file, False)
    if split == "valid" and train_file.is_file():
        return Located(train_file, True)
    raise DataError(f"{cfg.task} {split}: {split_file} not found (expected the DSS layout "
                    f"<data_dir>/{cfg.task}/{cfg.task}_<split>.json)")


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
            if isinstance(text, str) and has_lone_surrogate(text):
                bad[lo + k] = ("not_utf8", f"{name}[{k}] is not UTF-8 text")
            elif isinstance(text, str):
                cots[lo + k] = text
            else:
                bad[lo + k] = ("cot_mismatch", f"{name}[{k}] is not a string: {text!r}"[:200])
    return cots, bad, file_rejects


def _dss_cots(cfg: "DataConfig", located: Located, split: str, n_rows: int) -> tuple[dict, dict, list]:
    # the split file and the train file it may be carved from both sit in the task folder, beside llm/
    return _load_cots(Path(located.source).parent, split, COT_BATCH[cfg.task], n_rows)


register_format(Format("dss", f"the DSS layout of {', '.join(_DSS_BUILDERS)}", _dss_locate, _read_jsonl,
                       rows=lambda spec, cfg: _DSS_BUILDERS[cfg.task], tasks=tuple(_DSS_BUILDERS),
                       rationales=_dss_cots))
register_format(Format("jsonl", "a user task: a JSON Lines file or folder of splits, columns mapped by data.columns",
                       Files((".jsonl", ".json")), _read_jsonl))
register_format(Format("parquet", "a user task: a Parquet file or folder of splits, columns mapped by data.columns",
                       Files((".parquet",)), _read_parquet, position="index"))


# --------------------------------------------------------------------------------------------------------------
# hf: a Hugging Face datasets dataset

# our split -> the names a Hugging Face dataset may give it, in the order tried
HF_SPLITS = {"train": ("train",), "valid": ("valid", "validation", "dev"), "test": ("test",)}
# a single local data file: the datasets builder that reads it
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


def _hf_locate(cfg: "DataConfig", split: str) -> Located:
    """The dataset split to read (``data``); a rejected row names the dataset and split it came from."""
    found = _hf_dataset(cfg.data_dir)
    for name in HF_SPLITS.get(split, (split,)):
        if name in found:
            return Located(PurePosixPath(f"{cfg.data_dir}:{name}"), False, found[name])
    if split == "valid" and "train" in found:
        return Located(PurePosixPath(f"{cfg.data_dir}:train"), True, found["train"])
    raise DataError(f"{cfg.task} {split}: the dataset at {cfg.data_dir} has splits {', '.join(found)}, none of "
                    f"{', '.join(HF_SPLITS.get(split, (split,)))}")


def _read_hf(located: Located) -> Iterator[Record]:
    return ((index, "", record) for index, record in enumerate(located.data.to_list()))


register_format(Format("hf", "a user task: a Hugging Face dataset, read by the datasets package, its validation "
                             "split as valid, columns mapped by data.columns", _hf_locate, _read_hf, position="index"))
