"""One owner per axis (issue 23): teacher backends, tasks, data formats, methods and trackers are registry entries
that the config's choices and validation, the pipelines and serve read, so adding one is one entry plus its test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qcrd_ray.config import Config, ConfigError, describe, load_config
from qcrd_ray.data import prompts
from qcrd_ray.data.formats import FORMATS, Files, Format
from qcrd_ray.data.tasks import BUILTIN_TASKS, TaskSpec, get_task, register_task
from qcrd_ray.methods import METHODS
from qcrd_ray.teacher.backends import BACKENDS, ActorPool, Backend, backends_for
from qcrd_ray.teacher.sources import check_teacher, resolve_sources


def test_config_loads_the_registries_without_a_backend_or_tracker_implementation():
    code = ("import sys, qcrd_ray.config; heavy = [m for m in ('torch', 'pyarrow', 'httpx', 'ray', 'mlflow', 'wandb') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_choices_are_the_registries():
    assert describe("teacher.backend").allowed == " | ".join(BACKENDS)
    assert describe("train.method").allowed == " | ".join(METHODS)
    assert describe("data.format").allowed == " | ".join(FORMATS) == "dss | jsonl | parquet | hf"
    assert all(f"{f.name} ({f.help})" in describe("data.format").help for f in FORMATS.values())
    assert all(name in describe("data.task").help for name in BUILTIN_TASKS)
    assert backends_for("numeric") == list(BACKENDS) and "synthetic" not in backends_for("choice")


def test_what_a_backend_needs_is_its_entry():
    with pytest.raises(ConfigError, match="teacher.k: the recorded backend draws exactly 1 sample"):
        load_config(overrides=["teacher.backend=recorded"])
    for name in ("hf", "vllm"):
        with pytest.raises(ConfigError, match=f"teacher.model: the {name} backend needs a model"):
            load_config(overrides=[f"teacher.backend={name}"])
    assert load_config(overrides=["teacher.backend=http"]).teacher.model is None  # an endpoint may pick its own
    assert BACKENDS["recorded"].parse is prompts.parse_recorded_cot and BACKENDS["recorded"].needs_rationales
    assert not BACKENDS["synthetic"].needs_prompt and BACKENDS["vllm"].needs_prompt


def test_a_new_backend_is_one_entry(monkeypatch):
    monkeypatch.setitem(BACKENDS, "echo", Backend("echo", "repeats the question", ActorPool("echo", "Echo"),
                                                  serves=("choice",), needs_model=True))
    cfg = load_config(overrides=["teacher.backend=echo", "teacher.model=m", "data.task=cqa"])  # a valid choice
    check_teacher(cfg)
    with pytest.raises(ConfigError, match="teacher.backend: echo cannot teach task 'synthetic'"):
        check_teacher(cfg.replace(data={"task": "synthetic"}))
    with pytest.raises(ConfigError, match="the echo backend needs a model"):
        Config().replace(teacher={"sources": [{"name": "e", "backend": "echo"}]})
    mix = Config().replace(teacher={"sources": [{"name": "e", "backend": "echo", "model": "m"}, {"name": "s"}]})
    assert [s.backend.name for s in resolve_sources(mix)] == ["echo", "synthetic"]


def test_a_new_task_is_one_entry(monkeypatch):
    spec = TaskSpec("boolq", "choice", ("yes", "no"), prompt="text")
    monkeypatch.setitem(BUILTIN_TASKS, "boolq", spec)
    assert get_task("boolq") is spec and prompts._kind(spec, ()) == "text"
    from serve.schemas import served_tasks

    assert served_tasks("mine") == (*BUILTIN_TASKS, "mine") and "boolq" in served_tasks(None)
    assert register_task(spec) is BUILTIN_TASKS["boolq"]


def test_a_new_format_is_one_entry(monkeypatch, tmp_path):
    import csv

    from qcrd_ray.data.loaders import load_split

    def read_csv(located):  # (line, raw, record) for every row; line 1 is the header
        with open(located.source, newline="", encoding="utf-8") as f:
            yield from ((number, "", row) for number, row in enumerate(csv.DictReader(f), 2))

    with pytest.raises(ConfigError, match="data.format: 'csv' is not allowed; choose one of dss, jsonl, parquet, hf"):
        load_config(overrides=["data.format=csv"])
    monkeypatch.setitem(FORMATS, "csv", Format("csv", "a user task: a CSV file or folder of splits, columns mapped "
                                               "by data.columns", Files((".csv",)), read_csv))
    assert describe("data.format").allowed.endswith(" | hf | csv")
    (tmp_path / "train.csv").write_text("q,gold,why\n" + "".join(f"Is {i} even?,{'no' if i % 2 else 'yes'},{i} mod 2 "
                                                                 f"is {i % 2}\n" for i in range(9)) + "Is 9 even?,,\n")
    (tmp_path / "test.csv").write_text("q,gold,why\nIs 10 even?,yes,10 mod 2 is 0\n")
    cfg = load_config(overrides=["data.format=csv", "data.task=parity", f"data.data_dir={tmp_path}",
                                 "data.columns={input: q, label: gold, rationale: why}", "data.valid_fraction=0.2"])
    train, valid, test = (load_split(cfg.data, split) for split in ("train", "valid", "test"))
    # valid: 2 of train.csv's 10 rows (one of them is bad), train the other 8, test its own file
    assert (len(train.rows) + len(valid.rows), len(valid.rows) + len(valid.rejects), len(test.rows)) == (9, 2, 1)
    assert valid.summary["valid_carved_from_train"] and not test.summary["valid_carved_from_train"]
    assert (test.rows[0]["input"], test.rows[0]["label"], test.rows[0]["rationales"]) == (
        "Is 10 even?", "yes", ["10 mod 2 is 0"])
    bad = [r for split in (train, valid) for r in split.rejects]  # the row without a label, in whichever it fell
    assert [(r["line"], r["source"], r["kind"]) for r in bad] == [(11, "train.csv", "bad_field")]


def test_every_method_registers_its_targets_and_its_loss():
    from qcrd_ray.qcrd.step import LOSSES
    from qcrd_ray.qcrd.targets import TARGETS

    assert set(TARGETS) == set(LOSSES) == set(METHODS)


def test_trackers_are_a_registry():
    from qcrd_ray.trackers import TRACKERS

    assert describe("train.trackers").help.count(", ") >= len(TRACKERS) - 1
    assert all(name in describe("train.trackers").help for name in TRACKERS)
    with pytest.raises(ConfigError, match="choose from " + ", ".join(TRACKERS)):
        load_config(overrides=["train.trackers=[neptune]"])
