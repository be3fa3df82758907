"""Decoder-only students through Ray Train (2 DDP workers): a causal student learns with QCRD; with LoRA only the
adapters train, each snapshot is the adapter alone, the final model is exported merged and as an adapter that
both load to the same student, and a train worker killed mid-run resumes to the same final adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qcrd_ray import students
from qcrd_ray.evaluate import evaluate
from qcrd_ray.runs import MethodLayout, resolve_model
from qcrd_ray.students import lora
from qcrd_ray.train.trainer import run_training
from test_train import WorkerKiller, _same_initial_student, _step_metrics
from train_fixtures import small_config, write_teacher_dir

pytestmark = pytest.mark.ray

CAUSAL = {"family": "causal"}
# 3 rounds: the killed run below loses its workers in round 2, then resumes it and trains round 3 on the snapshot
# published after the restart
LORA_CFG = dict(student={**CAUSAL, "lora": {"r": 4}}, train={"rounds": 3, "round_steps": 4, "method": "qcrd"})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_teacher_dir(tmp_path_factory.mktemp("teacher"))


def test_a_causal_student_learns_with_qcrd(ray_session, teacher_dir, tmp_path):
    summary = run_training(small_config(student=CAUSAL, train={"round_steps": 6}), teacher_dir, tmp_path / "run")
    assert summary["steps"] == 18 and summary["adapter_dir"] is None
    assert not (tmp_path / "run" / "train" / "rejects.jsonl").exists()  # every prompt fits: none left out
    steps = _step_metrics(tmp_path / "run")
    first, last = steps[0]["loss"], sum(m["loss"] for m in steps[-3:]) / 3
    assert last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}"
    assert {m["round"]: m["neg_lag"] for m in steps} == {0: 0.0, 1: 1.0, 2: 1.0}  # lagged negatives, j = 1
    model, _ = students.load_pretrained(tmp_path / "run" / "model")
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.fixture(scope="module")
def lora_run(ray_session, teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, run_training(small_config(**LORA_CFG), teacher_dir, out)


def test_lora_snapshots_are_adapters_and_the_model_is_exported_merged_and_as_an_adapter(lora_run):
    out, summary = lora_run
    layout = MethodLayout.at(str(out))
    assert (summary["rounds"], summary["steps"]) == (3, 12) and summary["adapter_dir"] == layout.adapter
    full = (out / "train" / "init_model" / "model.safetensors").stat().st_size
    snapshots = sorted((out / "train" / "snapshots").glob("round_*.safetensors"))
    assert snapshots
    for snap in snapshots:
        assert set(load_file(str(snap))) and all("lora_" in k for k in load_file(str(snap)))
        assert snap.stat().st_size < 0.25 * full  # the adapter alone, not the student's weights
    assert lora.adapter_base(out / "adapter") == layout.init_model
    merged, tok = students.load_pretrained(out / "model")
    adapted, _ = students.load_pretrained(out / "adapter")
    assert not lora.is_lora(merged) and lora.is_lora(adapted)
    inputs = ["explain: Tom has 3 apples and gets 4 more. How many?", "predict: Ann has 9 pens and loses 2."]
    assert (students.generate(merged, tok, inputs, max_new_tokens=12)
            == students.generate(adapted, tok, inputs, max_new_tokens=12))
    # `qcrd eval` / `qcrd serve` take either: the adapter resolves to its method's run config, scores the same
    cfg = small_config(**LORA_CFG).replace(data={"synthetic_eval_size": 8})
    resolved = resolve_model(str(out / "adapter"))
    assert resolved.model_dir == str(out / "adapter") and resolved.config == small_config(**LORA_CFG)
    by_adapter = evaluate(out / "adapter", cfg, "test", "explain")
    by_merged = evaluate(out, cfg, "test", "explain")
    same = ("n", "correct", "unparsed")
    assert by_adapter["n"] == 8 and [by_adapter[k] for k in same] == [by_merged[k] for k in same]


def test_a_lora_run_killed_mid_training_resumes_to_the_same_adapter(lora_run, teacher_dir, tmp_path):
    whole, whole_summary = lora_run
    out = tmp_path / "killed"
    _same_initial_student(whole, out)
    with WorkerKiller(MethodLayout.at(str(out))) as killer:
        summary = run_training(small_config(**LORA_CFG), teacher_dir, out)
    assert killer.killed is not None and killer.started_workers() == 4
    assert (summary["rounds"], summary["steps"]) == (whole_summary["rounds"], whole_summary["steps"])
    assert [m["step"] for m in _step_metrics(out)] == list(range(1, 13))
    a = load_file(str(whole / "adapter" / lora.ADAPTER_WEIGHTS))
    b = load_file(str(out / "adapter" / lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
