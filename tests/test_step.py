"""The training step: collation, every method and ablation, the fast path equals the naive computation."""

import dataclasses

import pytest
import torch

from qcrd_ray.config import Config, StudentConfig, TrainConfig
from qcrd_ray.data import prompts
from qcrd_ray.methods import METHODS, method_spec
from qcrd_ray.qcrd.discriminator import Discriminator
from qcrd_ray.qcrd.step import DistillModel, make_batch
from qcrd_ray.qcrd.targets import candidate_targets, tokenizer_texts
from qcrd_ray.students import build_tiny, load_student


def sample(index, rationale, answer):
    return {"index": index, "text": f"<Explanation>: {rationale} <Answer>: {answer}", "rationale": rationale,
            "answer": answer, "status": "ok", "error": ""}


def teacher_rows():
    rows = []
    for i in range(4):
        a, b = i + 3, 2 * i + 2
        good, bad = f"( {a} + {b} )", f"( {a} - {b} )"
        pos = [f"Add {a} and {b} to get the total.", f"The total is {a} plus {b}.", f"We sum {a} and {b}."]
        neg = [f"Take {b} away from {a}."]
        rows.append({
            "id": f"s{i}", "task": "synthetic", "input": f"Tom has {a} apples and gets {b} more. How many?",
            "choices": [], "label": good, "positives": pos, "negatives": neg, "majority_answer": good,
            "agreement": 0.75, "teacher_correct": True,
            "samples": [sample(0, neg[0], bad)] + [sample(k + 1, p, good) for k, p in enumerate(pos)],
            "student_negatives": [f"apples apples {a} The answer is {b}."], "negative_round": 0,
        })
    # no positive (the teacher never agreed): keeps only its label task
    rows.append({**rows[0], "id": "nopos", "positives": [], "majority_answer": None, "samples": []})
    # no negative at all
    rows.append({**rows[1], "id": "noneg", "negatives": [], "student_negatives": []})
    return rows


def run(method, cfg=None):
    """``cfg`` (default: the defaults) training ``method``: the method is always read from ``train.method``."""
    return (cfg or Config()).replace(train={"method": method})


@pytest.fixture(scope="module")
def tok():
    rows = teacher_rows()
    texts = [prompts.student_input(m, r["input"]) for r in rows for m in ("predict", "explain")]
    texts += [t for r in rows for t in candidate_targets(r, Config())[0] + candidate_targets(r, Config())[1]]
    texts += [r["label"] for r in rows] + ["question: rationale: The answer is"]
    return load_student(StudentConfig(), texts)[1]


def build(tok, method, cfg=None, naive=False, seed=0):
    cfg = run(method, cfg)
    torch.manual_seed(seed)
    student = build_tiny(cfg.student, tok)
    disc = Discriminator.from_student(student, cfg.discriminator) if method_spec(cfg).uses_discriminator else None
    return DistillModel(student, disc, cfg, naive=naive)


def test_every_method_has_one_spec_named_by_the_config():
    assert set(METHODS) == set({f.name: f for f in dataclasses.fields(TrainConfig)}["method"].metadata["choices"])
    assert method_spec(Config()).name == Config().train.method == "qcrd"
    assert [method_spec(run(m)).name for m in METHODS] == list(METHODS)
    with pytest.raises(ValueError, match="train.method to one of finetune, dss, qcrd"):
        method_spec("distill")
    finetune, dss, qcrd = (method_spec(m) for m in ("finetune", "dss", "qcrd"))
    assert finetune.eval_modes == ("predict",) and dss.eval_modes == qcrd.eval_modes == ("predict", "explain")
    assert not finetune.explains and dss.explains and qcrd.explains


def test_the_ablation_switches_decide_within_what_the_method_allows():
    qcrd, dss = method_spec("qcrd"), method_spec("dss")
    assert qcrd.needs_discriminator(Config()) and not qcrd.needs_discriminator(
        Config().replace(loss={"quality_judge": False}))
    assert not dss.needs_discriminator(Config())  # QJ on by default, but D is no part of DSS
    assert [qcrd.needs_student_negatives(Config().replace(loss={"negatives": n}))
            for n in ("both", "student", "teacher", "none")] == [True, True, False, False]
    assert not dss.needs_student_negatives(Config())


def test_candidate_targets_follow_the_switches():
    row = teacher_rows()[0]
    pos, neg = candidate_targets(row, Config())
    assert pos[0] == prompts.explain_target(row["positives"][0], row["majority_answer"])
    # a teacher negative carries the wrong answer its own sample gave; the student's is verbatim
    assert neg == [prompts.explain_target(row["negatives"][0], row["samples"][0]["answer"]),
                   row["student_negatives"][0]]
    only = lambda **kw: candidate_targets(row, Config().replace(loss=kw))  # noqa: E731
    assert len(only(positives="single")[0]) == 1
    assert only(negatives="none")[1] == []
    assert only(negatives="teacher")[1] == neg[:1]
    assert only(negatives="student")[1] == neg[1:]
    # DSS: the first teacher sample, whatever its answer (one rationale per example, as distilling step-by-step)
    assert candidate_targets(row, run("dss")) == ([neg[0]], [])
    assert candidate_targets(row, run("finetune")) == ([], [])
    assert candidate_targets(teacher_rows()[-2], Config())[0] == []


def test_the_tokenizer_sees_every_teacher_target_of_every_method():
    rows = teacher_rows()
    texts = set(tokenizer_texts(rows))
    for method in METHODS:
        for row in rows:
            pos, neg = candidate_targets({**row, "student_negatives": []}, run(method))
            assert set(pos + neg) <= texts, method
    # a positive carries its own sample's answer, not the majority's (here they differ)
    row = {**rows[0], "majority_answer": "( 0 + 0 )"}
    assert prompts.explain_target(row["positives"][0], row["label"]) in tokenizer_texts([row])


def test_make_batch_shapes(tok):
    rows = teacher_rows()
    b = make_batch(rows, tok, Config())
    n_cands = sum(len(p) + len(n) for p, n in (candidate_targets(r, Config()) for r in rows))
    assert b.size == 6 and b.cand_labels.shape[0] == n_cands == b.disc_ids.shape[0]
    assert b.n_slots == 5 and b.cand_example.max() == 5
    assert b.negative_rounds == [0] * 6
    assert (b.cand_labels == -100).any() and (b.pred_labels[:, 0] != -100).all()
    f = make_batch(rows, tok, run("finetune"))
    assert f.method == "finetune" and f.cand_labels is None and f.expl_ids is None
    assert make_batch(rows, tok, Config().replace(loss={"quality_judge": "off"})).disc_ids is None
    assert make_batch(rows, tok, run("dss")).disc_ids is None  # D is no part of DSS
    with pytest.raises(ValueError, match="made for 'dss', model runs 'qcrd'"):
        build(tok, "qcrd")(make_batch(rows, tok, run("dss")))


@pytest.mark.parametrize("method", ["finetune", "dss", "qcrd"])
def test_one_step_per_method_reaches_student_and_discriminator(tok, method):
    model = build(tok, method)
    out = model(make_batch(teacher_rows(), tok, run(method)), alpha3=0.5)
    out.loss.backward()
    expected = {"finetune": {"loss", "l_pred", "l_rationale"}, "dss": {"loss", "l_pred", "l_rationale"},
                "qcrd": {"loss", "l_pred", "l_cl", "l_pos", "l_neg", "l_d", "s_pos", "s_neg"}}[method]
    assert expected <= set(out.metrics)
    assert torch.isfinite(out.loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["student.decoder.final_layer_norm.weight"].abs().sum() > 0
    if method != "finetune":  # the explain task reaches the encoder through the rationale targets
        assert grads["student.encoder.block.0.layer.0.SelfAttention.q.weight"].abs().sum() > 0
    if method == "qcrd":
        assert grads["disc.head.2.weight"].abs().sum() > 0
        assert grads["disc.encoder.block.0.layer.0.SelfAttention.q.weight"].abs().sum() > 0
        assert 0 < out.metrics["s_pos"] < 1 and 0 < out.metrics["s_neg"] < 1
        assert out.metrics["examples_without_positive"] == 1


@pytest.mark.parametrize("loss_cfg", [
    {}, {"scheme": "maxmin"}, {"scheme": "sampling"}, {"scheme": "mean"}, {"scheme": "wmean"},
    {"quality_judge": "off"}, {"negatives": "none"}, {"negatives": "student"}, {"positives": "single"},
    {"delta": 0.5}, {"margin_reduction": "sum"}, {"negative_pick": "max_within_margin"},
    {"negative_pick": "max_within_margin", "margin_reduction": "sum", "delta": 40.0},
])
def test_fast_path_equals_naive_all_candidates_with_grad(tok, loss_cfg):
    """The optimisation (encoder once, score without grad, grad on the selected only) changes cost, not the loss:
    same value and the same gradients as every candidate through the full model with gradient."""
    cfg = Config().replace(loss=loss_cfg)
    batch = make_batch(teacher_rows(), tok, cfg)
    fast, naive = build(tok, "qcrd", cfg), build(tok, "qcrd", cfg, naive=True)
    naive.load_state_dict(fast.state_dict())
    fast.eval(), naive.eval()  # dropout off: both paths see the same function
    out_fast, out_naive = fast(batch, alpha3=0.5), naive(batch, alpha3=0.5)
    assert out_fast.loss.item() == pytest.approx(out_naive.loss.item(), rel=1e-5, abs=1e-6)
    for key in ("l_cl", "l_pos", "l_neg", "l_d", "s_pos", "s_neg", "neg_beyond_margin_share"):
        assert out_fast.metrics[key] == pytest.approx(out_naive.metrics[key], rel=1e-5, abs=1e-6), key
    out_fast.loss.backward(), out_naive.loss.backward()
    for (name, p), q in zip(fast.named_parameters(), naive.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_quality_judge_off_needs_no_discriminator(tok):
    cfg = Config().replace(loss={"quality_judge": "off"})
    model = build(tok, "qcrd", cfg)
    assert model.disc is None
    out = model(make_batch(teacher_rows(), tok, cfg))
    assert out.metrics["s_pos"] == 1.0 and out.metrics["s_neg"] == 0.0 and out.metrics["l_d"] == 0.0
    with pytest.raises(ValueError, match="discriminator"):
        DistillModel(model.student, None, Config())


def test_batch_without_any_rationale_trains_only_the_label_task(tok):
    rows = [teacher_rows()[-2]]
    rows[0] = {**rows[0], "negatives": [], "student_negatives": []}
    model = build(tok, "qcrd")
    out = model(make_batch(rows, tok, Config()))
    assert out.metrics["l_cl"] == 0.0 and out.metrics["l_d"] == 0.0
    assert out.loss.item() == pytest.approx(0.5 * out.metrics["l_pred"])
    out.loss.backward()


@pytest.mark.parametrize("method", ["finetune", "dss", "qcrd"])
def test_a_few_optimizer_steps_lower_the_loss(tok, method):
    cfg = Config()
    model = build(tok, method, cfg)
    batch = make_batch(teacher_rows(), tok, run(method, cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.eval()  # dropout off so the comparison measures learning, not noise
    losses = []
    for _ in range(8):
        out = model(batch, alpha3=0.5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics["l_pred"] + out.metrics.get("l_rationale", 0.0) + out.metrics.get("l_pos", 0.0))
    assert losses[-1] < 0.8 * losses[0], losses


def test_fast_path_gives_gradient_to_the_selected_candidates_only(tok):
    model = build(tok, "qcrd")
    batch = make_batch(teacher_rows(), tok, Config())
    decoded = []
    inner = model.decode_losses

    def spy(b, hidden, which):
        decoded.append((torch.is_grad_enabled(), len(which)))
        return inner(b, hidden, which)

    model.decode_losses = spy
    model(batch)
    with_grad = sum(n for grad, n in decoded if grad)
    # one positive per example that has one (5 of 6) + one negative per example that has one (5 of 6)
    assert with_grad == 10
    assert sum(n for grad, n in decoded if not grad) == batch.cand_labels.shape[0]


def test_shared_encoder_discriminator_trains_the_student_encoder_through_l_d(tok):
    cfg = Config().replace(discriminator={"share_encoder": True, "layers": 0})
    model = build(tok, "qcrd", cfg)
    assert model.disc.encoder is model.student.get_encoder()
    batch = make_batch(teacher_rows(), tok, cfg)
    s = model.to_grid(batch, model.disc_scores(batch))
    from qcrd_ray.qcrd.losses import discriminator_loss

    discriminator_loss(s, model.to_grid(batch, batch.cand_positive), model.to_grid(batch, ~batch.cand_positive)).backward()
    assert model.student.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    model.zero_grad()
    model(batch).loss.backward()


def test_param_groups_give_the_discriminator_its_own_lr(tok):
    model = build(tok, "qcrd")
    student_group, disc_group = model.param_groups()
    assert disc_group["lr"] == Config().discriminator.lr and "lr" not in student_group
    n = sum(p.numel() for g in (student_group, disc_group) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    shared = build(tok, "qcrd", Config().replace(discriminator={"share_encoder": True, "layers": 0}))
    assert sum(p.numel() for g in shared.param_groups() for p in g["params"]) == sum(
        p.numel() for p in shared.parameters())  # the shared encoder is listed once, in the student's group
    assert len(build(tok, "dss").param_groups()) == 1


def test_gold_rule_positives_keep_their_own_answer_when_the_majority_is_wrong():
    row = {
        "id": "x", "input": "q", "label": "( 2.0 + 2.0 )", "majority_answer": "5",
        "positives": ["two plus two"], "negatives": ["two and three"],
        "samples": [
            {"index": 0, "status": "ok", "rationale": "two plus two", "answer": "4"},
            {"index": 1, "status": "ok", "rationale": "two and three", "answer": "5"},
            {"index": 2, "status": "ok", "rationale": "two and three", "answer": "5"},
        ],
    }
    cfg = Config().replace(self_consistency={"positive_rule": "gold"})
    pos, neg = candidate_targets(row, cfg)
    assert pos == ["two plus two The answer is 4."]
    assert neg[0] == "two and three The answer is 5."


def test_the_loss_switches_reach_the_step_and_its_beyond_margin_metric(tok):
    """neg_beyond_margin_share: an untrained student's negatives (token-mean CE ~6) are all beyond δ = 0.5 and
    none beyond δ = 50; on the sequence sum (|r| ≥ 10 tokens) δ = 50 is reached, and max_within_margin then
    picks a negative inside it wherever an example has one (the share can only fall)."""
    rows = teacher_rows()
    share = {}
    for key, loss in {"low": {"delta": 0.5}, "high": {"delta": 50.0},
                      "sum": {"delta": 50.0, "margin_reduction": "sum"},
                      "sum_within": {"delta": 50.0, "margin_reduction": "sum", "negative_pick": "max_within_margin"}
                      }.items():
        cfg = Config().replace(loss=loss)
        model = build(tok, "qcrd", cfg)
        model.eval()
        out = model(make_batch(rows, tok, cfg))
        share[key] = out.metrics["neg_beyond_margin_share"]
        out.loss.backward()
    assert share["low"] == 1.0 and share["high"] == 0.0
    assert share["sum"] > 0.0 and share["sum_within"] <= share["sum"]


def test_examples_whose_student_negative_is_missing_train_and_the_lag_counts_the_others(tok):
    """NegativePool.fetch leaves out the examples of a sampler lost for good; they train that round on teacher
    negatives, and the logged lag is the mean over the examples that have a student negative."""
    from qcrd_ray.train.loop import negative_lag, with_negatives

    rows = [{k: v for k, v in r.items() if k not in ("student_negatives", "negative_round")} for r in teacher_rows()]
    batch = make_batch(with_negatives(rows, {"s0": ("apples apples 3", 1), "s2": ("apples 5", 3)}), tok, Config())
    assert batch.negative_rounds == [1, None, 3, None, None, None]
    assert negative_lag(4, [batch, batch]) == (8.0, 4)  # (4 - 1) + (4 - 3), twice
    assert negative_lag(4, [make_batch(rows, tok, Config())]) == (0.0, 0)  # no lag logged, not a division by 0
    out = build(tok, "qcrd")(batch)
    assert torch.isfinite(out.loss) and out.metrics["n_negatives"] == 2 + 5  # 2 student, 5 teacher negatives
