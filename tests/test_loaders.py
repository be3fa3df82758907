import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qcrd_ray.cli import main
from qcrd_ray.config import DataConfig
from qcrd_ray.data.loaders import DataError, load_split
from qcrd_ray.data.prompts import parse_recorded_cot
from qcrd_ray.data.schema import EXAMPLE_SCHEMA
from qcrd_ray.data.tasks import NLI_LABELS


def _dss(shared_data, task, **kw):
    return DataConfig(data_dir=str(shared_data), task=task, **kw)


# ---------------------------------------------------------------------------------------------------- real data


def test_svamp_train_and_carved_valid_cover_the_800_rows(shared_data):
    train = load_split(_dss(shared_data, "svamp"), "train")
    valid = load_split(_dss(shared_data, "svamp"), "valid")
    assert (len(train.rows), len(valid.rows)) == (720, 80)
    assert valid.summary["valid_carved_from_train"]
    train_ids, valid_ids = {r["id"] for r in train.rows}, {r["id"] for r in valid.rows}
    assert not train_ids & valid_ids
    assert len(train_ids | valid_ids) == 800
    full = load_split(_dss(shared_data, "svamp", valid_fraction=0.0), "train")
    assert len(full.rows) == 800 and not full.rejects
    # row i is joined to line i % 500 of train_CoT_{i // 500}
    cot_1 = json.loads((shared_data / "svamp/llm/train_CoT_1.json").read_text())
    row_612 = next(r for r in full.rows if r["id"] == "svamp-train-612")
    assert row_612["rationales"] == [cot_1[112]]


def test_carve_out_is_deterministic_and_seeded(shared_data):
    a = [r["id"] for r in load_split(_dss(shared_data, "svamp"), "valid").rows]
    b = [r["id"] for r in load_split(_dss(shared_data, "svamp"), "valid").rows]
    c = [r["id"] for r in load_split(_dss(shared_data, "svamp", split_seed=1), "valid").rows]
    assert a == b and a != c


@pytest.mark.parametrize(
    "task, split, n",
    [("cqa", "train", 9741), ("anli1", "valid", 1000), ("esnli", "train", 10000)],
)
def test_benchmark_counts_and_rationale_join(shared_data, task, split, n):
    result = load_split(_dss(shared_data, task, valid_fraction=0.0), split)
    assert len(result.rows) == n and not result.rejects
    assert result.summary["with_rationale"] == n
    assert result.table().schema == EXAMPLE_SCHEMA
    # the join is right when the recorded teacher mostly agrees with gold (README: 66-77 %)
    agree = sum(parse_recorded_cot(task, r["rationales"][0], r["choices"]).answer == r["label"] for r in result.rows)
    assert 0.6 < agree / n < 0.8
    first = result.rows[0]
    assert first["task"] == task and first["label"] in first["choices"]


def test_row_contents(shared_data):
    cqa = load_split(_dss(shared_data, "cqa", max_rows=2), "train")
    assert len(cqa.rows) == 2
    row = cqa.rows[0]
    assert row["id"] == "6b819727eb8a670df26a7ffad036c119"
    assert row["input"].endswith("Answer Choices:\n(a) park\n(b) coloring book\n(c) garden center\n"
                                 "(d) math problem\n(e) gravity")
    assert row["label"] == "math problem"
    anli = load_split(_dss(shared_data, "anli1", max_rows=1), "valid").rows[0]
    assert anli["id"] == "bf628cf5-6948-4595-a6d0-daf99beb47b9"
    assert anli["input"].startswith("premise: Linguistics") and " hypothesis: Form and meaning" in anli["input"]
    assert anli["label"] == "contradiction" and anli["choices"] == list(NLI_LABELS)


def test_cqa_and_esnli_load_fast_enough_for_the_cli(shared_data):
    import time

    start = time.perf_counter()
    load_split(_dss(shared_data, "cqa"), "train")
    load_split(_dss(shared_data, "esnli"), "train")
    assert time.perf_counter() - start < 5  # loose: a regression to per-row file reads would take minutes


def test_missing_split_names_the_expected_file(shared_data):
    with pytest.raises(DataError, match="anli1_train.json"):
        load_split(_dss(shared_data, "anli1"), "train")


# ---------------------------------------------------------------------------------------------------- bad rows


def _write_jsonl(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def _svamp_rows(n):
    return [{"input": f"Tom has {i} apples. He buys 1 more.\nHow many?", "label": f"( {i}.0 + 1.0 )"} for i in range(n)]


def test_every_bad_row_is_recorded_never_fatal(tmp_path):
    lines = _svamp_rows(6)
    lines[1] = '{"input": "broken'  # bad JSON
    lines[2] = {"input": "no label"}  # missing field
    lines[3] = {"input": "q", "label": "( some - 8 )"}  # label is not an equation
    lines[4] = "[1, 2]"  # not an object
    _write_jsonl(tmp_path / "svamp/svamp_test.json", lines)
    (tmp_path / "svamp/llm").mkdir()
    (tmp_path / "svamp/llm/test_CoT_0.json").write_text(json.dumps([f"r{i}. The answer is {i}." for i in range(6)]))
    rejects_path = tmp_path / "out/rejects.jsonl"
    result = load_split(DataConfig(data_dir=str(tmp_path), task="svamp"), "test", rejects_path=rejects_path)
    assert [r["id"] for r in result.rows] == ["svamp-test-0", "svamp-test-5"]
    assert result.rows[1]["rationales"] == ["r5. The answer is 5."]
    assert [(r["line"], r["kind"]) for r in result.rejects] == [
        (2, "bad_json"), (3, "missing_field"), (4, "bad_label"), (5, "bad_json")]
    assert "missing field 'label'" in result.rejects[1]["reason"]
    assert result.rejects[0]["raw"] == '{"input": "broken'
    written = [json.loads(l) for l in rejects_path.read_text().splitlines()]
    assert written == result.rejects
    assert result.summary["rejected"] == 4
    assert result.summary["rejects_by_kind"] == {"bad_json": 2, "missing_field": 1, "bad_label": 1}


def test_choice_and_nli_labels_must_be_valid(tmp_path):
    cqa = {"id": "a", "question": "Where?", "choices": ["x", "y", "z", "u", "v"], "answer": "y"}
    _write_jsonl(tmp_path / "cqa/cqa_test.json", [cqa, {**cqa, "id": "b", "answer": "w"}, {**cqa, "id": "c", "choices": "x"}])
    result = load_split(DataConfig(data_dir=str(tmp_path), task="cqa"), "test")
    assert [r["id"] for r in result.rows] == ["a"]
    assert [r["kind"] for r in result.rejects] == ["label_not_in_choices", "bad_field"]
    assert "'w' is not among the choices" in result.rejects[0]["reason"]

    nli = {"premise": "p", "hypothesis": "h"}
    _write_jsonl(tmp_path / "esnli/esnli_test.json", [{**nli, "label": 0}, {**nli, "label": 5}, {**nli, "label": "neutral"}, nli])
    result = load_split(DataConfig(data_dir=str(tmp_path), task="esnli"), "test")
    assert [r["label"] for r in result.rows] == ["entailment", "neutral"]
    assert [r["kind"] for r in result.rejects] == ["label_not_in_choices", "missing_field"]


def test_cot_count_mismatch_rejects_only_the_rows_of_that_file(tmp_path):
    _write_jsonl(tmp_path / "svamp/svamp_test.json", _svamp_rows(620))
    llm = tmp_path / "svamp/llm"
    llm.mkdir()
    (llm / "test_CoT_0.json").write_text(json.dumps([f"cot {i}" for i in range(500)]))
    (llm / "test_CoT_1.json").write_text(json.dumps([f"cot {i}" for i in range(119)]))  # one short
    (llm / "test_CoT_2.json").write_text(json.dumps(["orphan"]))  # no rows left for it
    result = load_split(DataConfig(data_dir=str(tmp_path), task="svamp"), "test")
    assert len(result.rows) == 500 and result.rows[499]["rationales"] == ["cot 499"]
    row_rejects = [r for r in result.rejects if "line" in r]
    assert len(row_rejects) == 120 and {r["kind"] for r in row_rejects} == {"cot_mismatch"}
    assert "119 rationales for rows 500..619" in row_rejects[0]["reason"]
    file_rejects = [r for r in result.rejects if "line" not in r]
    assert [r["source"] for r in file_rejects] == ["llm/test_CoT_2.json"]
    assert len(result.rows) + len(row_rejects) == 620  # nothing dropped silently


def test_missing_or_broken_cot_file(tmp_path):
    _write_jsonl(tmp_path / "svamp/svamp_test.json", _svamp_rows(520))
    llm = tmp_path / "svamp/llm"
    llm.mkdir()
    (llm / "test_CoT_1.json").write_text("[not json")
    result = load_split(DataConfig(data_dir=str(tmp_path), task="svamp"), "test")
    assert not result.rows
    assert {r["kind"] for r in result.rejects[:500]} == {"cot_missing"}
    assert {r["kind"] for r in result.rejects[500:]} == {"cot_mismatch"}


def test_split_without_recorded_rationales_loads_with_none(tmp_path):
    _write_jsonl(tmp_path / "svamp/svamp_test.json", _svamp_rows(3))
    result = load_split(DataConfig(data_dir=str(tmp_path / "svamp"), task="svamp"), "test")  # the task folder works too
    assert len(result.rows) == 3 and all(r["rationales"] == [] for r in result.rows)
    assert result.summary["with_rationale"] == 0


# ---------------------------------------------------------------------------------------------------- user tasks


def test_user_jsonl_with_column_mapping_and_carved_valid(tmp_path):
    records = [{"qid": i, "question": f"q{i}", "options": ["red", "blue"], "gold": i % 2, "why": f"because {i}"}
               for i in range(20)]
    records[3] = {"qid": 3, "question": "q3", "options": ["red", "blue"], "gold": "green"}
    _write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DataConfig(data_dir=str(tmp_path), task="colors", format="jsonl", valid_fraction=0.25,
                     columns={"id": "qid", "input": "question", "choices": "options", "label": "gold",
                              "rationale": "why"})
    train, valid = load_split(cfg, "train"), load_split(cfg, "valid")
    assert len(train.rows) + len(valid.rows) + len(train.rejects) + len(valid.rejects) == 20
    assert len(valid.rows) + len(valid.rejects) == 5
    row = next(r for r in train.rows + valid.rows if r["id"] == "0")
    assert row == {"id": "0", "task": "colors", "input": "q0", "choices": ["red", "blue"], "label": "red",
                   "rationales": ["because 0"]}
    assert [r["kind"] for r in train.rejects + valid.rejects] == ["label_not_in_choices"]
    with pytest.raises(DataError, match="test"):
        load_split(cfg, "test")


def test_user_parquet_numeric_task(tmp_path):
    table = pa.table({"text": ["2 and 3", "4 and 5", "bad"], "answer": ["2 + 3", "20", "two"]})
    pq.write_table(table, tmp_path / "test.parquet")
    cfg = DataConfig(data_dir=str(tmp_path), task="adds", format="parquet", answer_type="numeric",
                     columns={"input": "text", "label": "answer"})
    result = load_split(cfg, "test")
    assert [r["label"] for r in result.rows] == ["2 + 3", "20"]
    assert [(r["index"], r["kind"]) for r in result.rejects] == [(2, "bad_label")]
    assert result.rows[0]["id"] == "adds-test-0"


LATIN1 = "café".encode("latin-1")  # b"caf\xe9": a byte that is not UTF-8


def test_dss_rejects_repeated_ids_and_bytes_that_are_not_utf8(tmp_path):
    cqa = {"question": "Where is it?", "choices": ["here", "there"], "answer": "here"}
    lines = [json.dumps({**cqa, "id": i}).encode() for i in ("a", "b", "a", "c", "d")]
    lines[3] = lines[3].replace(b"Where", b"Wh\xe9re")  # c: latin-1 in the question
    lines.append(b'{"id": "e", "question": "lone \\ud800 surrogate", "choices": ["here", "there"], "answer": "here"}')
    (tmp_path / "cqa/llm").mkdir(parents=True)
    (tmp_path / "cqa/cqa_test.json").write_bytes(b"\n".join(lines) + b"\n")
    cots = [f"r{i}. So the answer is here." for i in range(6)]
    # one CoT file for all rows: d's rationale holds a latin-1 byte, the others are clean
    payload = json.dumps(cots, ensure_ascii=False).encode().replace(b"r4.", b"r4 " + LATIN1 + b".")
    (tmp_path / "cqa/llm/test_CoT_0.json").write_bytes(payload)
    result = load_split(DataConfig(data_dir=str(tmp_path), task="cqa"), "test")
    assert [r["id"] for r in result.rows] == ["a", "b"]
    assert result.rows[0]["rationales"] == ["r0. So the answer is here."]  # the first "a" is kept, with its CoT
    assert [(r["line"], r["kind"]) for r in result.rejects] == [
        (3, "duplicate_id"), (4, "not_utf8"), (5, "not_utf8"), (6, "not_utf8")]
    assert "'a'" in result.rejects[0]["reason"] and "line 1" in result.rejects[0]["reason"]
    assert "0xe9" in result.rejects[1]["reason"] and "\\xe9" in result.rejects[1]["raw"]
    assert "test_CoT_0.json[4]" in result.rejects[2]["reason"]
    assert all("\ufffd" not in r["input"] + "".join(r["rationales"]) for r in result.rows)


def test_jsonl_rejects_repeated_ids_and_bytes_that_are_not_utf8_per_line(tmp_path):
    rec = {"question": "q", "options": ["red", "blue"], "gold": 0}
    lines = [json.dumps({**rec, "qid": i, "question": f"q{i}"}).encode() for i in (1, 2, 1, 3, 2)]
    lines[3] = lines[3].replace(b"q3", b"q3 " + LATIN1)
    (tmp_path / "test.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(data_dir=str(tmp_path), task="colors", format="jsonl",
                     columns={"id": "qid", "input": "question", "choices": "options", "label": "gold"})
    result = load_split(cfg, "test")
    assert [(r["id"], r["input"]) for r in result.rows] == [("1", "q1"), ("2", "q2")]
    assert [(r["line"], r["kind"]) for r in result.rejects] == [(3, "duplicate_id"), (4, "not_utf8"),
                                                                 (5, "duplicate_id")]


def test_duplicate_ids_are_checked_across_train_and_the_carved_valid(tmp_path):
    records = [{"qid": i % 15, "question": f"q{i}", "options": ["red", "blue"], "gold": i % 2} for i in range(20)]
    _write_jsonl(tmp_path / "train.jsonl", records)  # rows 15..19 repeat the ids of rows 0..4
    cfg = DataConfig(data_dir=str(tmp_path), task="colors", format="jsonl", valid_fraction=0.25,
                     columns={"id": "qid", "input": "question", "choices": "options", "label": "gold"})
    train, valid = load_split(cfg, "train"), load_split(cfg, "valid")
    kept = {r["input"] for r in train.rows + valid.rows}
    assert kept == {f"q{i}" for i in range(15)}  # always the first of a pair, whichever split holds it
    assert not {r["id"] for r in train.rows} & {r["id"] for r in valid.rows}
    assert sorted(r["line"] for r in train.rejects + valid.rejects) == [16, 17, 18, 19, 20]
    assert {r["kind"] for r in train.rejects + valid.rejects} == {"duplicate_id"}


def test_parquet_rejects_repeated_ids_and_values_that_are_not_utf8(tmp_path):
    texts = [b"2 and 3", b"4 and " + LATIN1, b"1 and 1", b"5 and 5"]
    table = pa.table({"id": ["x", "y", "x", "z"], "text": pa.array(texts, pa.binary()).view(pa.string()),
                      "answer": ["2 + 3", "4 + 5", "1 + 1", "5 + 5"]})
    pq.write_table(table, tmp_path / "test.parquet")
    cfg = DataConfig(data_dir=str(tmp_path), task="adds", format="parquet", answer_type="numeric",
                     columns={"input": "text", "label": "answer"})
    result = load_split(cfg, "test")
    assert [(r["id"], r["input"]) for r in result.rows] == [("x", "2 and 3"), ("z", "5 and 5")]
    assert [(r["index"], r["kind"]) for r in result.rejects] == [(1, "not_utf8"), (2, "duplicate_id")]
    assert "'text'" in result.rejects[0]["reason"]


def test_synthetic_is_the_default_and_other_tasks_need_data():
    assert load_split(DataConfig(synthetic_eval_size=7), "valid").summary["rows"] == 7
    with pytest.raises(DataError, match="data_dir"):
        load_split(DataConfig(task="svamp"), "train")
    with pytest.raises(DataError, match=r"format dss reads svamp, cqa, anli1, esnli; for task 'mine' use "
                                        r"data.format=jsonl, parquet or hf with data.columns"):
        load_split(DataConfig(data_dir="/tmp", task="mine"), "train")
    with pytest.raises(DataError, match="data.format 'xml' is not a format; choose one of dss, jsonl, parquet, hf"):
        load_split(DataConfig(data_dir="/tmp", task="mine", format="xml"), "train")  # built without validation


# ---------------------------------------------------------------------------------------------------- CLI


def test_data_inspect_json(tmp_path, capsys):
    lines = _svamp_rows(4) + ['{"bad json']
    _write_jsonl(tmp_path / "svamp/svamp_test.json", lines)
    rejects = tmp_path / "rejects.jsonl"
    code = main(["data", "inspect", "--data", str(tmp_path), "--task", "svamp", "--split", "test", "--json",
                 "--rejects", str(rejects)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["task"], out["split"], out["rows"], out["rejects"]) == ("svamp", "test", 4, 1)
    assert out["label_distribution"] == {"+": 4}
    assert out["rejected"][0]["line"] == 5 and out["rejected"][0]["kind"] == "bad_json"
    assert len(rejects.read_text().splitlines()) == 1


def test_data_inspect_text_and_errors(tmp_path, capsys):
    assert main(["data", "inspect", "--split", "test", "--set", "data.synthetic_eval_size=5"]) == 0
    out = capsys.readouterr().out
    assert "synthetic / test: 5 rows, 0 rejected" in out and "label distribution" in out
    assert main(["data", "inspect", "--data", str(tmp_path), "--task", "svamp"]) == 1
    assert "svamp_train.json not found" in capsys.readouterr().err
    assert main(["data", "inspect", "--set", "data.bogus=1"]) == 2
