"""``data.format: hf``: a Hugging Face ``datasets`` dataset read as a user task, through the same column mapping and
row checks as JSONL/Parquet (tested on datasets saved locally; a hub name goes through the same loader online)."""

from __future__ import annotations

import json

import pytest

from qcrd_ray.config import DataConfig

datasets = pytest.importorskip("datasets")

from qcrd_ray.data.loaders import DataError, load_split  # noqa: E402


def _records(n, offset=0):
    return [{"qid": f"q{i + offset}", "question": f"Is {i + offset} even?", "options": ["yes", "no"],
             "gold": (i + offset) % 2, "why": f"{i + offset} mod 2 is {(i + offset) % 2}"} for i in range(n)]


COLUMNS = {"id": "qid", "input": "question", "choices": "options", "label": "gold", "rationale": "why"}


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(data_dir=str(path), task="parity", format="hf", columns=COLUMNS, **kw)


def test_a_saved_dataset_dict_with_its_validation_split(tmp_path):
    splits = {"train": _records(12), "validation": _records(4, 100), "test": _records(3, 200)}
    bad = {**_records(1, 300)[0], "gold": 7}  # a label index outside the choices: rejected, not fatal
    splits["test"].append(bad)
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "ds")
    train = load_split(_cfg(tmp_path / "ds"), "train")
    assert [r["id"] for r in train.rows] == [f"q{i}" for i in range(12)]  # no valid carved: it has its own
    first = train.rows[0]
    assert (first["input"], first["choices"], first["label"], first["rationales"], first["task"]) == (
        "Is 0 even?", ["yes", "no"], "yes", ["0 mod 2 is 0"], "parity")
    valid = load_split(_cfg(tmp_path / "ds"), "valid")
    assert [r["id"] for r in valid.rows] == [f"q{i}" for i in range(100, 104)]
    assert valid.summary["source"].endswith("ds:validation") and not valid.summary["valid_carved_from_train"]
    test = load_split(_cfg(tmp_path / "ds"), "test")
    assert len(test.rows) == 3 and [(r["index"], r["kind"], r["source"]) for r in test.rejects] == [
        (3, "label_not_in_choices", "ds:test")]


def test_a_dataset_without_validation_has_valid_carved_from_train(tmp_path):
    datasets.Dataset.from_list(_records(20)).save_to_disk(tmp_path / "one")  # a Dataset, not a dict: its train
    train, valid = (load_split(_cfg(tmp_path / "one", valid_fraction=0.25), s) for s in ("train", "valid"))
    assert len(train.rows) == 15 and len(valid.rows) == 5 and valid.summary["valid_carved_from_train"]
    assert not {r["id"] for r in train.rows} & {r["id"] for r in valid.rows}


def test_local_data_files_and_unreadable_locations(tmp_path):
    (tmp_path / "files").mkdir()
    for split, rows in (("train", _records(6)), ("test", _records(2, 50))):
        (tmp_path / "files" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_split(_cfg(tmp_path / "files"), "test").rows) == 2  # a folder: split by file name
    # a file: the train split, valid carved from it as for a JSONL file
    assert len(load_split(_cfg(tmp_path / "files" / "train.jsonl", valid_fraction=0.5), "train").rows) == 3
    with pytest.raises(DataError, match="has splits train, none of test"):
        load_split(_cfg(tmp_path / "files" / "train.jsonl"), "test")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="format hf reads"):
        load_split(_cfg(tmp_path / "notes.md"), "train")
