"""QCRD's cost options (issue 13): each changes what it says and nothing else.

Shallow D, D on the student's question states, L_D on a sample of examples (unbiased), deduplicated candidates
(exact for min/max), bf16 autocast, gradient accumulation, chunked candidate scoring.
"""

import itertools

import pytest
import torch

from qcrd_ray.config import Config, StudentConfig
from qcrd_ray.data import prompts
from qcrd_ray.qcrd import losses as L
from qcrd_ray.qcrd.discriminator import Discriminator, Pair, train_on_pairs
from qcrd_ray.qcrd.step import DistillModel, accumulate, make_batch
from qcrd_ray.qcrd.targets import candidate_targets
from qcrd_ray.students import build_tiny, load_student


def sample(index, rationale, answer):
    return {"index": index, "text": rationale, "rationale": rationale, "answer": answer, "status": "ok", "error": ""}


def rows(n=4, duplicates=True):
    """SVAMP-like rows; with ``duplicates`` two of the three positives are the same text (common at T = 0.7)."""
    out = []
    for i in range(n):
        a, b = i + 3, 2 * i + 2
        good, bad = f"( {a} + {b} )", f"( {a} - {b} )"
        pos = [f"Add {a} and {b} to get the total.", f"The total is {a} plus {b}."]
        pos.append(pos[0] if duplicates else f"We sum {a} and {b}.")
        neg = f"Take {b} away from {a}."
        out.append({
            "id": f"s{i}", "task": "synthetic", "input": f"Tom has {a} apples and gets {b} more. How many?",
            "choices": [], "label": good, "positives": pos, "negatives": [neg], "majority_answer": good,
            "agreement": 0.75, "teacher_correct": True,
            "samples": [sample(0, neg, bad)] + [sample(k + 1, p, good) for k, p in enumerate(pos)],
            "student_negatives": [f"apples apples {a} The answer is {b}."], "negative_round": 0,
        })
    return out


@pytest.fixture(scope="module")
def tok():
    texts = []
    for r in rows(duplicates=False):
        texts += [prompts.student_input(m, r["input"]) for m in ("predict", "explain")] + [r["label"]]
        pos, neg = candidate_targets(r, Config())
        texts += pos + neg
    texts += ["question: rationale: The answer is"]
    return load_student(StudentConfig(), texts)[1]


def build(tok, cfg, seed=0):
    torch.manual_seed(seed)
    student = build_tiny(cfg.student, tok)
    return DistillModel(student, Discriminator.from_student(student, cfg.discriminator), cfg).eval()  # no dropout


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, atol=1e-5):
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=1e-4, msg=name)


# ---- discriminator.layers


def test_shallow_discriminator_has_fewer_layers_and_learns(tok):
    cfg = Config().replace(discriminator={"layers": 1})
    torch.manual_seed(0)
    student = build_tiny(cfg.student, tok)
    full = Discriminator.from_student(student, Config().replace(discriminator={"layers": 0}).discriminator)
    shallow = Discriminator.from_student(student, cfg.discriminator)
    assert len(full.encoder.block) == len(student.get_encoder().block) >= 2
    assert len(shallow.encoder.block) == 1 and len(student.get_encoder().block) >= 2  # the student is untouched
    assert sum(p.numel() for p in shallow.parameters()) < sum(p.numel() for p in full.parameters())
    # separable: good rationales name the numbers' sum, bad ones are unrelated words
    pairs = [Pair(f"What is {a} plus {b}?", f"Add {a} and {b} to get the total.", 1.0) for a, b in [(3, 2), (4, 4)]]
    pairs += [Pair(f"What is {a} plus {b}?", "apples apples apples", 0.0) for a, b in [(3, 2), (4, 4)]]
    stats = train_on_pairs(shallow, tok, pairs, steps=40, batch_size=4, lr=1e-3, max_len=64, seed=0, progress=False)
    assert stats["loss_last"] < 0.5 * stats["loss_first"], stats  # 0.69 -> < 0.35 (measured ≈ 0.01 with seed 0)
    with pytest.raises(ValueError, match="discriminator.layers=9 exceeds"):
        Discriminator.from_student(student, Config().replace(discriminator={"layers": 9}).discriminator)
    with pytest.raises(ValueError, match="share_encoder"):
        Discriminator.from_student(student, Config().replace(discriminator={"layers": 1,
                                                                            "share_encoder": True}).discriminator)


# ---- discriminator.share_question_states


def test_question_states_come_from_the_student_and_get_no_gradient_from_d(tok):
    cfg = Config().replace(discriminator={"share_question_states": True}, loss={"alpha1": 0.0, "alpha2": 0.0})
    model = build(tok, cfg)
    batch = make_batch(rows(), tok, cfg)
    # D reads the rationale alone: shorter inputs than "question: x rationale: r"
    assert batch.disc_ids.shape[1] < make_batch(rows(), tok, Config()).disc_ids.shape[1]
    out = model(batch)
    assert out.metrics["l_d"] != 0.0
    out.loss.backward()  # L_D alone (α1 = α2 = 0)
    student_grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert all(g.abs().sum() == 0 for g in student_grads)  # detached states: D's loss never moves the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.disc.parameters())


# ---- discriminator.pairs_per_step


def test_sampled_discriminator_loss_is_unbiased_by_exact_enumeration():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 4, generator=gen)
    pos = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]).bool()
    neg = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]).bool()
    mult = torch.tensor([[1, 2, 1, 1], [3, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 1.]])
    full = L.discriminator_loss(scores, pos, neg, mult)
    valid = [i for i in range(6) if pos[i].any() and neg[i].any()]  # rows 3 (no negative), 4 (no positive) out
    for k in range(1, len(valid) + 1):
        values = []
        for subset in itertools.combinations(valid, k):
            rows_ = torch.zeros(6, dtype=torch.bool)
            rows_[list(subset)] = True
            values.append(L.discriminator_loss(scores, pos & rows_[:, None], neg & rows_[:, None], mult))
        torch.testing.assert_close(torch.stack(values).mean(), full, atol=1e-6, rtol=0)


def test_pairs_per_step_draws_whole_valid_examples_uniformly(tok):
    cfg = Config().replace(discriminator={"pairs_per_step": 4})  # 4 pairs per example (deduplicated) -> 1 example
    model = build(tok, cfg)
    batch = make_batch(rows(), tok, cfg)
    pos, neg = model.to_grid(batch, batch.cand_positive), model.to_grid(batch, ~batch.cand_positive)
    counts = torch.zeros(batch.size)
    for _ in range(400):
        drawn = model.d_sample(batch, pos, neg)
        assert int(drawn.sum()) == 1
        counts += drawn
    # uniform over the 4 examples: each drawn 100 ± 30 times (binomial sd 8.7: a 3.4 sd margin)
    assert ((counts - 100).abs() <= 30).all(), counts
    out = model.train()(batch)
    out.loss.backward()  # runs, D gets gradient only through the drawn example's pairs
    assert out.metrics["l_d"] != 0.0


# ---- train.dedup_candidates


@pytest.mark.parametrize("scheme", ["minmax", "mean"])
def test_dedup_gives_the_same_losses_and_gradients(tok, scheme):
    base = Config().replace(loss={"scheme": scheme}, discriminator={"pairs_per_step": 0})  # L_D on every pair
    on, off = base.replace(train={"dedup_candidates": True}), base.replace(train={"dedup_candidates": False})
    b_on, b_off = make_batch(rows(), tok, on), make_batch(rows(), tok, off)
    assert b_on.cand_labels.shape[0] == b_off.cand_labels.shape[0] - 4  # one duplicate positive per example
    assert b_on.cand_mult.max() == 2.0
    m_on, m_off = build(tok, on), build(tok, off)
    o_on, o_off = m_on(b_on), m_off(b_off)
    for key in ("loss", "l_pred", "l_cl", "l_d", "l_pos", "l_neg", "s_pos", "s_neg", "n_positives"):
        assert o_on.metrics[key] == pytest.approx(o_off.metrics[key], abs=1e-5), key
    o_on.loss.backward()
    o_off.loss.backward()
    assert_same_grads(m_on, m_off)


# ---- train.grad_accum_steps, train.score_chunk_mb, train.precision


def test_two_half_micro_batches_give_the_gradient_of_one_batch(tok):
    cfg = Config()
    data = rows(4)
    one, two = build(tok, cfg), build(tok, cfg)
    accumulate(one, [make_batch(data, tok, cfg)], 0.5)
    metrics = accumulate(two, [make_batch(data[:2], tok, cfg), make_batch(data[2:], tok, cfg)], 0.5)
    assert_same_grads(one, two)
    assert metrics["l_d"] != 0.0


def test_chunked_scoring_equals_unchunked(tok):
    cfg = Config()
    model = build(tok, cfg)
    batch = make_batch(rows(), tok, cfg)
    hidden = model.encode_explain(batch)
    model.score_chunk = 3
    chunked = model.score_candidates(batch, hidden)
    model.score_chunk = 10_000
    torch.testing.assert_close(chunked, model.score_candidates(batch, hidden), atol=1e-5, rtol=1e-5)
    # train.score_chunk_mb sizes the chunk to memory: 2 × T × vocab × 4 bytes per candidate
    per_candidate = 2 * 4 * batch.cand_labels.shape[1] * model.student.config.vocab_size
    sized = DistillModel(model.student, model.disc, cfg.replace(train={"score_chunk_mb": 1}))
    assert sized.chunk_size(batch) == max(1, 2**20 // per_candidate)
    assert DistillModel(model.student, model.disc, cfg).chunk_size(batch) == 256 * 2**20 // per_candidate


def test_bf16_step_runs_and_is_close_to_fp32(tok):
    fp32, bf16 = Config(), Config().replace(train={"precision": "bf16"})
    batch = make_batch(rows(), tok, fp32)
    out32, out16 = build(tok, fp32)(batch), build(tok, bf16)(batch)
    assert out16.loss.dtype == torch.float32  # losses and reductions in fp32
    # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 per op, a few % after the network
    assert out16.metrics["loss"] == pytest.approx(out32.metrics["loss"], rel=0.05)
    out16.loss.backward()
