"""One owner per axis (issue 23): teacher backends, tasks, methods and trackers are registry entries that the
config's choices and validation, the pipelines and serve read, so adding one is one entry plus its test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qcrd_ray.config import Config, ConfigError, describe, load_config
from qcrd_ray.data import prompts
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
