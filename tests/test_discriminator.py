"""The quality discriminator D: shapes and range, pooling over real tokens, augmentation, pre-training."""

import random

import pytest
import torch
import torch.nn.functional as F

from qcrd_ray.config import Config, StudentConfig
from qcrd_ray.qcrd.discriminator import (
    Discriminator,
    augment,
    balanced_pairs,
    encode_pairs,
    mask_words,
    pretrain_discriminator,
    refresh,
    replace_words,
)
from qcrd_ray.students import load_student

GOOD = ["add the two numbers so the total is {a} plus {b}", "the sum of {a} and {b} is the answer"]
BAD = ["purple cats fly over the moon at night", "bananas are yellow and ducks swim"]


def toy_rows(n=12):
    rows = []
    for i in range(n):
        a, b = i + 2, 2 * i + 1
        rows.append({
            "id": f"t{i}", "task": "synthetic", "input": f"What is {a} plus {b}?", "label": f"( {a} + {b} )",
            "positives": [g.format(a=a, b=b) for g in GOOD], "negatives": [BAD[i % 2]],
            "majority_answer": f"( {a} + {b} )",
        })
    return rows


@pytest.fixture(scope="module")
def student_and_tok():
    rows = toy_rows()
    texts = [r["input"] for r in rows] + [t for r in rows for t in r["positives"] + r["negatives"]]
    texts += ["question: rationale: predict: explain: The answer is"]
    torch.manual_seed(0)
    return load_student(StudentConfig(), texts)


def test_scores_in_unit_interval_with_one_per_pair(student_and_tok):
    student, tok = student_and_tok
    disc = Discriminator.from_student(student, Config().discriminator)
    enc = encode_pairs(tok, ["What is 2 plus 3?"] * 3, ["short", "a much longer rationale text here", "x"], 64)
    s = disc(enc["input_ids"], enc["attention_mask"])
    assert s.shape == (3,)
    assert ((s > 0) & (s < 1)).all()


def test_separate_copy_by_default_shared_on_request(student_and_tok):
    student, _ = student_and_tok
    own = Discriminator.from_student(student, Config().discriminator)
    assert own.encoder is not student.get_encoder()
    first = next(iter(student.get_encoder().state_dict()))
    assert torch.equal(own.encoder.state_dict()[first], student.get_encoder().state_dict()[first])
    shared_cfg = Config().replace(discriminator={"share_encoder": True, "layers": 0})
    shared = Discriminator.from_student(student, shared_cfg.discriminator)
    assert shared.encoder is student.get_encoder()


def test_max_pooling_ignores_padding(student_and_tok):
    student, tok = student_and_tok
    disc = Discriminator.from_student(student, Config().discriminator).eval()
    alone = encode_pairs(tok, ["What is 2 plus 3?"], ["add them"], 64)
    padded = encode_pairs(tok, ["What is 2 plus 3?"] * 2, ["add them", "a much longer rationale " * 5], 64)
    with torch.no_grad():
        s_alone = disc(alone["input_ids"], alone["attention_mask"])
        s_padded = disc(padded["input_ids"], padded["attention_mask"])
        # pad positions hold large activations if they leaked into the max, the score would change
        poisoned = padded["input_ids"].clone()
        poisoned[0][padded["attention_mask"][0] == 0] = 5
        s_poisoned = disc(poisoned, padded["attention_mask"])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # really padded
    assert s_padded[0].item() == pytest.approx(s_alone[0].item(), abs=1e-5)
    assert s_poisoned[0].item() == pytest.approx(s_alone[0].item(), abs=1e-5)


def test_word_masking_and_replacement_are_seeded_and_keep_length():
    text = "one two three four five six seven eight"
    a = mask_words(text, 0.3, random.Random(1), "<mask>")
    assert a == mask_words(text, 0.3, random.Random(1), "<mask>")
    assert a != text and len(a.split()) == 8 and "<mask>" in a
    b = replace_words(text, 0.5, random.Random(2), ["zebra"])
    assert len(b.split()) == 8 and "zebra" in b
    assert augment(text, Config().discriminator, random.Random(3), "<mask>", ["zebra"]) != text


def test_balanced_pairs_tops_up_the_rarer_class_with_augmented_copies():
    pos = [("q", f"good rationale number {i}") for i in range(5)]
    neg = [("q", "bad rationale here")]
    pairs = balanced_pairs(pos, neg, Config().discriminator, random.Random(0), "<mask>")
    labels = [p.label for p in pairs]
    assert labels.count(1.0) == labels.count(0.0) == 5
    augmented = [p for p in pairs if p.augmented]
    assert len(augmented) == 4 and all(p.label == 0.0 and p.rationale != "bad rationale here" for p in augmented)
    assert balanced_pairs(pos, [], Config().discriminator, random.Random(0), "<mask>") == []


def _bce(disc, tok, rows):
    q, r, y = [], [], []
    for row in rows:
        for text, label in [(t, 1.0) for t in row["positives"]] + [(t, 0.0) for t in row["negatives"]]:
            q.append(row["input"]), r.append(text), y.append(label)
    enc = encode_pairs(tok, q, r, 64)
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(disc.eval().logits(enc["input_ids"], enc["attention_mask"]),
                                                  torch.tensor(y)).item()


def test_pretraining_lowers_bce_on_a_separable_set(student_and_tok):
    student, tok = student_and_tok
    torch.manual_seed(0)  # D's head init and dropout; the fixture pins the student, seed=0 the pair order
    # lr 3e-3 overshot on some initialisations (BCE rose); 1e-3 for 60 steps reached 0.47 of the initial BCE on
    # one of 10 seeds. 120 steps, seeds 0-11 (student, D and pair order all reseeded): after/before 0.0004-0.33
    # (this seed: 0.659 -> 0.143, 0.22), so 0.5 holds with margin
    cfg = Config().replace(discriminator={"lr": 1e-3, "pretrain_steps": 120, "pretrain_batch_size": 8})
    disc = Discriminator.from_student(student, cfg.discriminator)
    rows = toy_rows()
    before = _bce(disc, tok, rows)
    stats = pretrain_discriminator(disc, tok, rows, cfg, steps=1000, progress=False, seed=0)
    assert stats["steps"] == 120  # capped by pretrain_steps
    assert stats["positives"] == 24 and stats["negatives"] == 12 and stats["augmented"] == 12
    assert stats["skipped"] is None
    after = _bce(disc, tok, rows)
    assert after < 0.5 * before, (before, after)


def test_pretraining_stops_when_a_class_is_missing(student_and_tok):
    student, tok = student_and_tok
    disc = Discriminator.from_student(student, Config().discriminator)
    rows = [dict(r, negatives=[]) for r in toy_rows(3)]
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    stats = pretrain_discriminator(disc, tok, rows, Config(), progress=False)
    assert stats["steps"] == 0 and "negatives" in stats["skipped"]
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items())


def test_refresh_uses_student_negatives(student_and_tok):
    student, tok = student_and_tok
    disc = Discriminator.from_student(student, Config().discriminator)
    rows = [dict(r, negatives=[], student_negatives=["the moon is made of cheese"]) for r in toy_rows(3)]
    stats = refresh(disc, tok, rows, Config(), steps=2)
    assert stats["steps"] == 2 and stats["negatives"] == 3 and stats["skipped"] is None


def test_d_is_trained_on_the_texts_the_training_step_scores():
    """Pre-training/refresh and the online step must show D the same form of text (rationale + its answer), or D
    learns the form instead of the quality."""
    from qcrd_ray.config import Config
    from qcrd_ray.qcrd.discriminator import _teacher_pairs
    from qcrd_ray.qcrd.targets import candidate_targets

    row = {
        "id": "x", "input": "q", "label": "( 2.0 + 2.0 )", "majority_answer": "4",
        "positives": ["two plus two"], "negatives": ["two and three"],
        "samples": [{"index": 0, "status": "ok", "rationale": "two plus two", "answer": "4"},
                    {"index": 1, "status": "ok", "rationale": "two and three", "answer": "5"}],
        "student_negatives": ["two times two The answer is 4."],
    }
    positives, negatives = _teacher_pairs([row], student_negatives=True)
    pos, neg = candidate_targets(row, Config())
    assert [t for _, t in positives] == pos == ["two plus two The answer is 4."]
    assert [t for _, t in negatives] == neg
    assert "two and three The answer is 5." in neg
