"""Where a run trained (qcrd_ray/provenance.py) and what a sweep says about it: one fingerprint per kind of
machine, a record per start that survives a failing store, and summary.md's warning when a sweep's trials
trained on unlike machines (the same seed is then another student: docs/quality.md, "Same seed, same result")."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from qcrd_ray import provenance, storage
from qcrd_ray.sweep.output import machines_note


def _env(cpu="AMD EPYC 9B14", capability="AVX512", threads=1, torch_version="2.13.0+cpu", gpu=None, host="a"):
    return {"host": host, "cpu": cpu, "cpu_capability": capability, "torch_threads": threads, "gpu": gpu,
            "packages": {"torch": torch_version, "transformers": "5.25.0", "tokenizers": "0.23.3"}}


def test_the_environment_names_this_machine_and_install():
    env = provenance.environment()
    assert env["cpu"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["packages"]["torch"] == importlib.metadata.version("torch")
    assert env["packages"]["qcrd-ray"] == importlib.metadata.version("qcrd-ray")
    assert set(env["packages"]) == set(provenance.PACKAGES)


def test_a_fingerprint_changes_with_what_moves_the_floats_and_not_with_the_host():
    base = provenance.fingerprint(_env())
    assert provenance.fingerprint(_env(host="b")) == base  # another node of the same kind: the same student
    for other in (_env(cpu="Intel Xeon 8481C"), _env(capability="AVX2"), _env(threads=2),
                  _env(torch_version="2.12.0+cpu"), _env(gpu="NVIDIA H100 80GB HBM3")):
        assert provenance.fingerprint(other) != base
    assert "AVX512" in base and "torch 2.13.0+cpu" in base


def test_machines_lists_each_kind_a_run_trained_on_once_in_order():
    a, b = _env(), _env(capability="AVX2")
    assert provenance.machines([a, _env(host="b")]) == provenance.fingerprint(a)
    assert provenance.machines([a, b, a]) == f"{provenance.fingerprint(a)} + {provenance.fingerprint(b)}"
    assert provenance.machines([]) is None  # trained before provenance was recorded


def test_each_start_appends_a_line(tmp_path):
    where = str(tmp_path / "train" / "environment.jsonl")
    provenance.record_start(where, step=0, world_size=2)
    provenance.record_start(where, step=8, world_size=2)
    starts = storage.read_jsonl(where)
    assert [(s["step"], s["world_size"]) for s in starts] == [(0, 2), (8, 2)]
    assert starts[1]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_store_that_fails_costs_the_record_not_the_training(tmp_path, monkeypatch, caplog):
    def down(*_):
        raise OSError("When uploading part: connection reset")  # what pyarrow's S3 raises past its retries
    monkeypatch.setattr(storage, "write_jsonl", down)
    provenance.record_start(str(tmp_path / "environment.jsonl"), step=0, world_size=1)  # must not raise
    assert "could not record the training environment" in caplog.text


@pytest.mark.parametrize("rows, warned", [
    ([{"machine": "m1"}, {"machine": "m1"}], False),
    ([{"machine": "m1"}, {"machine": None}], False),  # an older trial recorded nothing: nothing to compare
    ([{"machine": "m1"}, {"machine": "m2"}, {"machine": "m1"}, {}], True),
])
def test_a_sweep_warns_when_its_trials_trained_on_unlike_machines(rows, warned):
    lines = machines_note(rows)
    assert bool(lines) == warned
    if warned:
        assert "2 unlike machines" in lines[0]
        assert lines[1:4] == ["- 2 trials: m1", "- 1 trial: m2", "- 1 trial: not recorded"]
