import pytest
import torch

from qcrd_ray.config import StudentConfig
from qcrd_ray.data.synthetic import make_split
from qcrd_ray.students import generate, load_pretrained, load_student, save_student
from qcrd_ray.students.tokenizer import train_tokenizer

CFG = StudentConfig(tiny_d_model=32, tiny_d_ff=64, tiny_layers=1, tiny_heads=2, tiny_vocab_size=300)
ROWS = make_split("train", train_size=200, eval_size=1)
TEXTS = [r["input"] for r in ROWS] + [r["label"] for r in ROWS]


@pytest.fixture(scope="module")
def trained():
    """A tiny student trained a little on three examples, so its outputs are non-trivial strings."""
    torch.manual_seed(0)
    model, tok = load_student(CFG, TEXTS)
    inputs = [f"predict: {r['input']}" for r in ROWS[:3]]
    targets = [r["label"] for r in ROWS[:3]]
    batch = tok(inputs, text_target=targets, return_tensors="pt", padding=True)
    batch["labels"][batch["labels"] == tok.pad_token_id] = -100
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.eval()  # no dropout: learn fast; generate() must restore this mode
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    return model, tok, inputs, targets


def test_tokenizer_specials_digits_and_lossless_decode():
    tok = train_tokenizer(TEXTS, 300)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    text = "( 84.0 / 12.0 ) Tom has 1234 apples, 7% more!"
    ids = tok(text)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(not any(c.isdigit() for c in p) or len(p.strip("▁")) == 1 for p in pieces)  # one digit per token
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) <= 300


# Rare characters on purpose: characters the trainer prunes and adds back are scored in its hash order.
DETERMINISM_SCRIPT = """
import json, sys
from qcrd_ray.data.synthetic import make_split
from qcrd_ray.students.tokenizer import train_tokenizer
rows = make_split("train", train_size=300, eval_size=1)
texts = [r["input"] for r in rows] + [r["label"] for r in rows]
texts += ["naïve café → 3½ × 2 ≈ 7 ┌─┐ └─┘ α β γ δ ∑ ∪ ±", "Zoë's jalapeño costs $4 @ 10% off; #1 {x} [y] ~z"]
tok = train_tokenizer(texts, 500)
probe = "Zoë has 12 boxes ┌─┐ and 7 × 3 ≈ 21, naïve?"
print(json.dumps({"tokenizer": tok.backend_tokenizer.to_str(), "ids": tok(probe)["input_ids"]}))
"""


def test_tokenizer_is_a_pure_function_of_its_texts():
    """Same texts, same vocabulary, scores and ids: in separate processes with different hash seeds (the Unigram
    trainer's own hash order is random per process)."""
    import json
    import os
    import subprocess
    import sys

    runs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], env=env, check=True, capture_output=True,
                             text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r == runs[0] for r in runs[1:])
    vocab = json.loads(runs[0]["tokenizer"])["model"]["vocab"]
    assert [piece for piece, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"]
    assert 2 not in runs[0]["ids"]  # every character of the text is in the vocabulary: no <unk>


def test_tiny_model_follows_the_config():
    model, tok = load_student(CFG, TEXTS)
    assert model.config.d_model == 32 and model.config.num_layers == 1 and model.config.num_heads == 2
    assert model.config.vocab_size == len(tok)
    assert model.config.decoder_start_token_id == tok.pad_token_id == 0


def test_tiny_needs_texts():
    with pytest.raises(ValueError, match="texts"):
        load_student(CFG)
    with pytest.raises(ValueError, match="no text"):
        load_student(CFG, ["", " "])


def test_save_load_round_trip_gives_identical_outputs(trained, tmp_path):
    model, tok, inputs, targets = trained
    before = generate(model, tok, inputs, max_new_tokens=16)
    assert all(before) and len(set(before)) > 1  # real, input-dependent strings, so the comparisons mean something
    path = save_student(model, tok, tmp_path / "student")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    reloaded, tok2 = load_pretrained(path)
    assert generate(reloaded, tok2, inputs, max_new_tokens=16) == before
    enc = tok(inputs, return_tensors="pt", padding=True)
    assert enc["input_ids"].tolist() == tok2(inputs, return_tensors="pt", padding=True)["input_ids"].tolist()
    model.eval()
    with torch.no_grad():
        decoder = torch.zeros((len(inputs), 1), dtype=torch.long)
        assert torch.equal(model(**enc, decoder_input_ids=decoder).logits,
                           reloaded(**enc, decoder_input_ids=decoder).logits)
    # a local path given as student.model goes through the same from_pretrained branch
    via_cfg, _ = load_student(StudentConfig(model=str(path)))
    assert generate(via_cfg, tok2, inputs, max_new_tokens=16) == before


def test_batching_does_not_change_greedy_outputs(trained):
    model, tok, inputs, _ = trained
    mixed = inputs + ["predict: Tom has 3 apples."]
    assert generate(model, tok, mixed, max_new_tokens=16, batch_size=2) == \
        generate(model, tok, mixed, max_new_tokens=16, batch_size=32)


def test_sampling_is_seeded(trained):
    model, tok, inputs, _ = trained
    inputs = inputs * 2
    a = generate(model, tok, inputs, max_new_tokens=12, temperature=2.0, seed=1)
    assert a == generate(model, tok, inputs, max_new_tokens=12, temperature=2.0, seed=1)
    assert a != generate(model, tok, inputs, max_new_tokens=12, temperature=2.0, seed=2)
    model.train()
    generate(model, tok, inputs[:1], max_new_tokens=2)
    assert model.training  # generate() restores the caller's train/eval mode
    model.eval()


def test_generate_reports_the_outputs_cut_off_at_max_new_tokens(trained):
    """The sampler counts student negatives that never reached their end (a too-small snapshots.max_new_tokens):
    an output is cut off exactly when a larger budget would have continued it."""
    model, tok, inputs, _ = trained
    inputs = inputs + ["predict: Tom has 3 apples.", "explain: Ann has 5 pens."]
    flags: list[bool] = []
    texts = generate(model, tok, inputs, max_new_tokens=12, cut_off=flags)
    longer = generate(model, tok, inputs, max_new_tokens=64)
    assert len(flags) == len(inputs)
    for text, cut, more in zip(texts, flags, longer):
        assert (more != text) == cut, (text, more, cut)
    short: list[bool] = []
    generate(model, tok, inputs, max_new_tokens=1, cut_off=short)
    assert short == [True] * len(inputs)  # no output ends with its first token here
