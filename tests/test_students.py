"""Student families (no Ray): the causal family end to end at the step level, LoRA on both families, chat
templates, generation and streaming, D's encoder per family, and the errors a user of a wrong model gets."""

import json

import pytest
import torch

from qcrd_ray import students
from qcrd_ray.config import Config, LoraConfig, StudentConfig
from qcrd_ray.data import prompts
from qcrd_ray.qcrd.discriminator import Discriminator
from qcrd_ray.qcrd.losses import sequence_ce
from qcrd_ray.qcrd.step import DistillModel, make_batch
from qcrd_ray.qcrd.targets import candidate_targets
from qcrd_ray.students import lora
from qcrd_ray.students.base import StudentError
from test_step import teacher_rows

FAMILIES = ("seq2seq", "causal")


def config(family: str, **sections) -> Config:
    cfg = Config().replace(student={"family": family})
    return cfg.replace(**sections) if sections else cfg


def texts():
    rows = teacher_rows()
    out = [prompts.student_input(m, r["input"]) for r in rows for m in ("predict", "explain")]
    out += [t for r in rows for t in sum(candidate_targets(r, Config()), [])]
    return out + [r["label"] for r in rows] + ["question: rationale: The answer is"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_tok(request):
    torch.manual_seed(0)
    _, tok = students.load_student(StudentConfig(family=request.param), texts())
    return request.param, tok


def build(family, tok, cfg, naive=False, seed=0, lora_r=0):
    torch.manual_seed(seed)
    student = students.build_tiny(cfg.student, tok)
    if lora_r:
        student = lora.apply_lora(student, LoraConfig(r=lora_r), family)
    disc = Discriminator.from_student(student, cfg.discriminator) if cfg.loss.quality_judge else None
    return DistillModel(student, disc, cfg, naive=naive)


# ---------------------------------------------------------------------------------------------- families


def test_family_is_chosen_by_name_or_read_from_the_models_config(tmp_path):
    assert students.resolve_family(StudentConfig()).name == "seq2seq"  # tiny under auto: today's T5
    assert students.resolve_family(StudentConfig(family="causal")).name == "causal"
    torch.manual_seed(0)
    model, tok = students.load_student(StudentConfig(family="causal"), texts())
    assert type(model).__name__ == "LlamaForCausalLM" and students.family_of(model).name == "causal"
    students.save_student(model, tok, tmp_path / "m")
    assert students.resolve_family(StudentConfig(model=str(tmp_path / "m"))).name == "causal"
    again, _ = students.load_pretrained(tmp_path / "m")
    assert type(again).__name__ == "LlamaForCausalLM"
    # a model that is neither: the error names its type
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(StudentError, match="model_type 'vit'.*neither a seq2seq"):
        students.resolve_family(StudentConfig(model=str(tmp_path / "vit")))
    with pytest.raises(StudentError, match="is not a seq2seq model"):
        students.load_student(StudentConfig(model=str(tmp_path / "m"), family="seq2seq"))


def test_causal_loss_covers_completion_tokens_only():
    """Our per-target CE equals Hugging Face's own loss over prompt + completion with the prompt masked -100."""
    family = students.family_named("causal")
    torch.manual_seed(0)
    model, tok = students.load_student(StudentConfig(family="causal"), texts())
    model.eval()
    prompt = family.prompt(tok, "explain: Tom has 3 apples and gets 4 more. How many?")
    ids, mask = family.encode_prompts(tok, [prompt])
    labels = family.encode_targets(tok, ["Add 3 and 4. The answer is ( 3 + 4 )."], 64)
    assert labels[0, -1] == tok.eos_token_id  # a completion ends, so generation learns to stop
    ours = sequence_ce(family.target_logits(model, ids, mask, labels), labels)
    full = torch.cat([ids, labels], dim=1)
    hf_labels = torch.cat([torch.full_like(ids, -100), labels], dim=1)
    assert ours.item() == pytest.approx(model(input_ids=full, labels=hf_labels).loss.item(), rel=1e-5)


@pytest.mark.parametrize("sections", [
    {}, {"loss": {"scheme": "mean"}}, {"loss": {"quality_judge": "off"}},
    {"discriminator": {"layers": 0, "pairs_per_step": 0}}, {"discriminator": {"share_question_states": True}},
])
def test_shared_prompt_fast_path_equals_one_full_pass_per_candidate(family_tok, sections):
    """The prefix-shared path (prompt once, candidates on its keys/values; an encoder once for seq2seq) gives the
    loss and the gradients of every candidate through the full model, to 1e-5."""
    family, tok = family_tok
    cfg = config(family, **sections)
    batch = make_batch(teacher_rows(), tok, cfg)
    fast, naive = build(family, tok, cfg), build(family, tok, cfg, naive=True)
    naive.load_state_dict(fast.state_dict())
    fast.eval(), naive.eval()
    out_fast, out_naive = fast(batch, alpha3=0.5), naive(batch, alpha3=0.5)
    assert out_fast.loss.item() == pytest.approx(out_naive.loss.item(), rel=1e-5, abs=1e-6)
    for key in ("l_cl", "l_pos", "l_neg", "l_d"):
        assert out_fast.metrics[key] == pytest.approx(out_naive.metrics[key], rel=1e-5, abs=1e-6), key
    out_fast.loss.backward(), out_naive.loss.backward()
    for (name, p), q in zip(fast.named_parameters(), naive.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["finetune", "dss", "qcrd"])
def test_every_method_learns_with_a_causal_student(method):
    torch.manual_seed(0)
    cfg = config("causal", train={"method": method})
    _, tok = students.load_student(cfg.student, texts())
    model = build("causal", tok, cfg)
    batch = make_batch(teacher_rows(), tok, cfg)
    opt = torch.optim.AdamW([g for group in model.param_groups() for g in group["params"]], lr=3e-3)
    model.eval()
    losses = []
    for _ in range(12):
        out = model(batch, alpha3=0.5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics["loss"])  # (l_pos alone moves with D's weight and the chosen positive)
    assert losses[-1] < 0.8 * losses[0], losses


def test_causal_discriminator_is_a_cut_copy_of_the_decoder_stack(family_tok):
    family, tok = family_tok
    torch.manual_seed(0)
    student = students.build_tiny(StudentConfig(family=family, tiny_layers=3), tok)
    d1 = Discriminator.from_student(student, Config().discriminator)  # layers 1 (the default)
    d_all = Discriminator.from_student(student, Config().discriminator.__class__(layers=0))
    _, blocks1 = students.base.blocks_of(d1.encoder.base if family == "causal" else d1.encoder)
    _, blocks_all = students.base.blocks_of(d_all.encoder.base if family == "causal" else d_all.encoder)
    assert (len(blocks1), len(blocks_all)) == (1, 3)
    assert not ({id(p) for p in d1.parameters()} & {id(p) for p in student.parameters()})  # a copy
    with pytest.raises(StudentError, match="exceeds the student's 3 layers"):
        Discriminator.from_student(student, Config().discriminator.__class__(layers=4))


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters_and_its_snapshot_is_the_adapter(family_tok):
    family, tok = family_tok
    cfg = config(family)
    model = build(family, tok, cfg, lora_r=4)
    trainable = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    groups = model.param_groups()
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.student.parameters() if p.requires_grad}
    assert all(p.requires_grad for p in groups[1]["params"])  # D's own copy trains in full
    out = model(make_batch(teacher_rows(), tok, cfg), alpha3=0.5)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.student.named_parameters() if "lora_" not in n)
    state = lora.trainable_state(model.student)
    full = model.student.get_base_model().state_dict()
    assert set(state) == {k for k in state if "lora_" in k}
    assert sum(v.numel() for v in state.values()) < 0.2 * sum(v.numel() for v in full.values())


def test_lora_adapter_reloads_and_merges_to_the_same_function(family_tok, tmp_path):
    family, tok = family_tok
    cfg = StudentConfig(family=family, lora=LoraConfig(r=4))
    torch.manual_seed(0)
    base = students.build_tiny(cfg, tok)
    students.save_student(base, tok, tmp_path / "init")
    torch.manual_seed(1)
    model, _ = students.load_for_training(cfg, tmp_path / "init")
    with torch.no_grad():  # a trained adapter (B is zero at init)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    students.save_student(model, tok, tmp_path / "ckpt")
    assert lora.is_adapter_dir(tmp_path / "ckpt") and not (tmp_path / "ckpt" / "model.safetensors").exists()
    resumed, _ = students.load_for_training(cfg, tmp_path / "init", tmp_path / "ckpt")
    for (k, a), b in zip(lora.trainable_state(model).items(), lora.trainable_state(resumed).values()):
        assert torch.equal(a, b), k
    ids = ["explain: Tom has 3 apples and gets 4 more. How many?"]
    greedy = students.generate(model, tok, ids, max_new_tokens=12)
    assert students.generate(lora.merged(model), tok, ids, max_new_tokens=12) == greedy
    lora.set_base(tmp_path / "ckpt", str(tmp_path / "init"))  # as the exported adapter names its base
    from_adapter, _ = students.load_pretrained(tmp_path / "ckpt")
    assert students.generate(from_adapter, tok, ids, max_new_tokens=12) == greedy


def test_lora_target_modules_that_do_not_exist_name_the_ones_that_do(family_tok):
    family, tok = family_tok
    torch.manual_seed(0)
    model = students.build_tiny(StudentConfig(family=family), tok)
    expected = "q_proj" if family == "causal" else "wo"
    with pytest.raises(StudentError, match=f"attention not in the model; its linear modules are .*{expected}"):
        lora.apply_lora(model, LoraConfig(r=4, target_modules=("attention",)), family)


# ---------------------------------------------------------------------------------------------- text


def test_chat_template_auto_none_or_a_file(tmp_path, caplog):
    family = students.family_named("causal")
    torch.manual_seed(0)
    _, tok = students.load_student(StudentConfig(family="causal"), texts())
    assert family.prompt(tok, "predict: x") == "predict: x"  # no template: the task prompt as it is
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    _, templated = students.load_student(StudentConfig(family="causal", chat_template=str(template)), texts())
    assert family.prompt(templated, "predict: x") == "<user>predict: x\n<assistant>"
    assert family.chat_prompt(templated, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) \
        == "<system>s\n<user>q\n<assistant>"
    assert not family.add_special_tokens(templated)
    family.prepare_tokenizer(templated, "none")
    assert family.prompt(templated, "predict: x") == "predict: x"
    with pytest.raises(StudentError, match="neither auto, none nor a Jinja file"):
        family.prepare_tokenizer(templated, str(tmp_path / "missing.jinja"))


def test_generation_is_reproducible_and_streaming_gives_the_same_text(family_tok):
    family_name, tok = family_tok
    family = students.family_named(family_name)
    torch.manual_seed(0)
    model = students.build_tiny(StudentConfig(family=family_name), tok)
    inputs = [r["input"] for r in teacher_rows()[:3]]
    explain = [prompts.student_input("explain", x) for x in inputs]
    cut: list[bool] = []
    greedy = students.generate(model, tok, explain, max_new_tokens=10, cut_off=cut)
    assert len(greedy) == len(cut) == 3 and all(cut)  # a random model never stops within 10 tokens
    assert students.generate(model, tok, explain, max_new_tokens=10, batch_size=1) == greedy  # padding-free
    sampled = [students.generate(model, tok, explain, max_new_tokens=10, temperature=1.5, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]
    stream_cut: list[bool] = []
    streamed = "".join(family.stream(model, tok, family.prompt(tok, explain[0]), max_new_tokens=10,
                                     cut_off=stream_cut))
    assert streamed.strip() == greedy[0] and stream_cut == [True]
    # an output that ends at its end-of-sequence token is not cut off (OpenAI's finish_reason "stop"): make the
    # first token greedy decoding emits the model's end of sequence
    ids, mask = family.encode_prompts(tok, [family.prompt(tok, explain[0])], None)
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)[0, -1]
    model.generation_config.eos_token_id = int(first)
    cut, stream_cut = [], []
    students.generate(model, tok, explain[:1], max_new_tokens=10, cut_off=cut)
    "".join(family.stream(model, tok, family.prompt(tok, explain[0]), max_new_tokens=10, cut_off=stream_cut))
    assert cut == stream_cut == [False]


def test_a_prompt_that_exhausts_memory_alone_loses_only_its_own_output(family_tok, monkeypatch):
    """generate bisects a batch that runs out of memory: the poison prompt gets "" and is reported in ``failed``
    (the engine hands the sampler None for it), every other prompt gets the output it gets in a healthy batch."""
    from qcrd_ray.students.engines import HFEngine

    family_name, tok = family_tok
    torch.manual_seed(0)
    model = students.build_tiny(StudentConfig(family=family_name), tok)
    explain = [prompts.student_input("explain", r["input"]) for r in teacher_rows()[:4]]
    healthy = students.generate(model, tok, explain, max_new_tokens=6, batch_size=4)
    family = students.family_named(family_name)
    ids, mask = family.encode_prompts(tok, [family.prompt(tok, explain[2])], None)
    poison = ids[0][mask[0].bool()].tolist()
    real = model.generate

    def generate(input_ids, attention_mask, **kwargs):
        if any(row[m.bool()].tolist() == poison for row, m in zip(input_ids, attention_mask)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    failed: list[int] = []
    out = students.generate(model, tok, explain, max_new_tokens=6, batch_size=4, failed=failed)
    assert failed == [2] and out[2] == "" and [o for i, o in enumerate(out) if i != 2] == [
        o for i, o in enumerate(healthy) if i != 2]

    engine = HFEngine.__new__(HFEngine)
    engine.model, engine.tokenizer = model, tok
    texts, cut = engine.sample(explain, temperature=0.0, seed=0, max_new_tokens=6, batch_size=4)
    assert texts[2] is None and texts[:2] == healthy[:2] and len(cut) == 4


def test_prompts_longer_than_the_student_reads_are_named_not_truncated(family_tok):
    family_name, tok = family_tok
    family = students.family_named(family_name)
    rows = [{"id": "short", "input": "Tom has 3 apples."}, {"id": "long", "input": "Tom has 3 apples. " * 40}]
    rejects = students.long_prompts(family, tok, rows, max_len=32)
    assert [r["id"] for r in rejects] == ["long"]
    assert "predict prompt of" in rejects[0]["reason"] and "student.max_input_len=32" in rejects[0]["reason"]
    assert students.long_prompts(family, tok, rows, max_len=32, modes=("explain",))[0]["reason"].startswith("explain")


def test_nested_lora_keys_are_config(tmp_path):
    from qcrd_ray.config import ConfigError, load_config

    cfg = load_config(None, ["student.lora.r=8", "student.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.student.lora == LoraConfig(r=8, target_modules=("q_proj", "v_proj"))
    assert json.loads(json.dumps(cfg.to_dict()))["student"]["lora"]["r"] == 8
    with pytest.raises(ConfigError, match="unknown key student.lora.rank; allowed keys in 'student.lora'"):
        load_config(None, ["student.lora.rank=8"])
    with pytest.raises(ConfigError, match="student.family: 'decoder' is not allowed"):
        load_config(None, ["student.family=decoder"])


def test_a_stream_stops_when_asked():
    import threading

    family = students.family_named("causal")
    torch.manual_seed(0)
    model, tok = students.load_student(StudentConfig(family="causal"), texts())
    stop = threading.Event()
    pieces = []
    for piece in family.stream(model, tok, "explain: Tom has 3 apples.", max_new_tokens=200, stop=stop):
        pieces.append(piece)
        stop.set()  # a client gone after its first piece: generation ends at the next token
    assert 1 <= len(pieces) <= 3
