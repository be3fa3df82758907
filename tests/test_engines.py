"""Negative-sampling engines (no Ray): the hf engine for real, the vllm engine's contract against a fake ``vllm``
module (vLLM cannot be installed on these machines; what it is handed must be what vLLM loads)."""

import sys
import types

import pytest
import torch

from qcrd_ray import students
from qcrd_ray.config import LoraConfig, SnapshotConfig, StudentConfig
from qcrd_ray.students import lora
from qcrd_ray.students.base import StudentError
from qcrd_ray.students.engines import HFEngine, VLLMEngine, build_engine

TEXTS = ["explain: Tom has 3 apples and gets 4 more. How many?", "We add 3 and 4. The answer is ( 3 + 4 ).",
         "predict: Ann has 5 pens and loses 2. How many?", "( 5 - 2 )"] * 5
INPUTS = ["explain: Tom has 3 apples and gets 4 more. How many?", "explain: Ann has 5 pens and loses 2. How many?"]


class FakeLLM:
    """Records what vLLM's ``LLM`` would be given; answers deterministically from each prompt's seed."""

    instances: list["FakeLLM"] = []

    def __init__(self, model, tokenizer=None, **options):
        self.model, self.tokenizer, self.options, self.calls = model, tokenizer, options, []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": list(prompts), "params": list(params), "lora_request": lora_request})
        out = []
        for prompt, p in zip(prompts, params):
            finish = "length" if p.seed % 2 else "stop"
            out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" sample {p.seed} ",
                                                                            finish_reason=finish)]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, lora_int_id, path: types.SimpleNamespace(
        lora_name=name, lora_int_id=lora_int_id, lora_path=path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    FakeLLM.instances = []
    return FakeLLM


def saved_student(path, family="causal"):
    torch.manual_seed(0)
    model, tok = students.load_student(StudentConfig(family=family), TEXTS)
    students.save_student(model, tok, path)
    return path


def trained_adapter_state(model_dir, cfg):
    torch.manual_seed(1)
    model, _ = students.load_for_training(cfg, model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, lora.trainable_state(model)


def test_hf_engine_samples_a_snapshot_reproducibly(tmp_path):
    cfg = StudentConfig(family="causal", lora=LoraConfig(r=4))
    model_dir = saved_student(tmp_path / "init")
    engine = build_engine("hf", model_dir, cfg, SnapshotConfig())
    assert isinstance(engine, HFEngine)
    _, state = trained_adapter_state(model_dir, cfg)
    engine.load(3, state)
    first = engine.sample(INPUTS, temperature=1.5, seed=7, max_new_tokens=8, batch_size=2)
    texts, cut_off = first
    assert len(texts) == len(cut_off) == 2 and all(isinstance(t, str) for t in texts)
    assert engine.sample(INPUTS, temperature=1.5, seed=7, max_new_tokens=8, batch_size=2) == first
    with pytest.raises(StudentError, match="snapshots.engine 'sglang': choose one of hf, vllm"):
        build_engine("sglang", model_dir, cfg, SnapshotConfig())


def test_vllm_engine_serves_each_lora_snapshot_as_a_lora_request(tmp_path, fake_vllm):
    cfg = StudentConfig(family="causal", lora=LoraConfig(r=4), max_input_len=100)
    model_dir = saved_student(tmp_path / "init")
    snaps = SnapshotConfig(engine="vllm", max_new_tokens=20)
    engine = build_engine("vllm", model_dir, cfg, snaps)
    assert isinstance(engine, VLLMEngine)
    (llm,) = fake_vllm.instances
    assert llm.model == str(model_dir)  # the base, loaded once
    assert llm.options["enable_lora"] and llm.options["max_lora_rank"] == 4 and llm.options["max_model_len"] == 120
    trained, state = trained_adapter_state(model_dir, cfg)
    engine.load(2, state)
    texts, cut_off = engine.sample(INPUTS, temperature=1.5, seed=100, max_new_tokens=20, batch_size=8)
    assert texts == ["sample 100", "sample 101"] and cut_off == [False, True]  # HF engine's record shapes
    call = llm.calls[-1]
    assert [p.temperature for p in call["params"]] == [1.5, 1.5] and [p.seed for p in call["params"]] == [100, 101]
    assert [p.max_tokens for p in call["params"]] == [20, 20]
    family = students.family_named("causal")
    _, tok = students.load_pretrained(model_dir)
    assert call["prompts"] == [family.prompt(tok, t) for t in INPUTS]
    req = call["lora_request"]
    assert req.lora_int_id == 3 and req.lora_name == "snapshot-2"
    # what vLLM is pointed at is an adapter peft itself loads to the same weights
    from peft import PeftModel

    base, _ = students.load_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, req.lora_path)
    for (key, a), b in zip(lora.trainable_state(trained).items(), lora.trainable_state(loaded).values()):
        assert torch.equal(a, b), key
    engine.load(3, state)  # the next round: a new id; the engine keeps only the adapter it serves
    engine.sample(INPUTS, temperature=1.5, seed=0, max_new_tokens=20, batch_size=8)
    assert llm.calls[-1]["lora_request"].lora_int_id == 4
    assert sorted(p.name for p in engine.work.iterdir()) == ["round_0003"]


def test_vllm_engine_reloads_full_weight_snapshots_and_refuses_seq2seq(tmp_path, fake_vllm):
    cfg = StudentConfig(family="causal")
    model_dir = saved_student(tmp_path / "init")
    engine = build_engine("vllm", model_dir, cfg, SnapshotConfig(engine="vllm"))
    model, _ = students.load_pretrained(model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    engine.load(1, model.state_dict())
    assert len(fake_vllm.instances) == 2 and engine.request is None  # rebuilt on the snapshot's weights
    reloaded, _ = students.load_pretrained(fake_vllm.instances[-1].model)
    for (key, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(StudentError, match="causal .* students only: vLLM dropped encoder-decoder"):
        build_engine("vllm", saved_student(tmp_path / "t5", "seq2seq"), StudentConfig(), SnapshotConfig())
