"""QCRD losses (Eq. 2-8) against small hand-computed cases."""

import math

import pytest
import torch

from qcrd_ray.qcrd import losses as L

T, F_ = True, False


def test_sequence_ce_is_token_mean_and_ignores_padding():
    # two target tokens with probabilities 1/2 and 1/4 (vocab 4), then padding
    logits = torch.log(torch.tensor([[[0.5, 0.5, 1e-9, 1e-9], [0.25, 0.25, 0.25, 0.25], [9.0, 0, 0, 0]]]))
    labels = torch.tensor([[0, 3, -100]])
    expected = (math.log(2) + math.log(4)) / 2
    assert L.sequence_ce(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    # a sequence with no target token is 0, not NaN
    assert L.sequence_ce(logits, torch.full((1, 3), -100)).item() == 0.0


def test_margin_gives_zero_gradient_beyond_delta():
    losses = torch.tensor([1.0, 2.9, 3.5, 5.0], requires_grad=True)
    out = L.margin(losses, delta=3.0)
    assert out.tolist() == pytest.approx([-2.0, -0.1, 0.0, 0.0])
    out.sum().backward()
    assert losses.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_minmax_selects_min_positive_and_max_negative_respecting_masks():
    values = torch.tensor([[3.0, 1.0, 0.5, 9.0], [2.0, 4.0, 0.0, 0.0]])
    pos_mask = torch.tensor([[T, T, F_, F_], [T, F_, F_, F_]])
    neg_mask = torch.tensor([[F_, F_, T, T], [F_, T, F_, F_]])
    w_pos = L.candidate_weights(values, pos_mask, "minmax", positive=True)
    w_neg = L.candidate_weights(values, neg_mask, "minmax", positive=False)
    # masked-out 0.5 and 0.0 are never picked as the min positive
    assert w_pos.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert w_neg.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]
    # maxmin is the reverse
    assert L.candidate_weights(values, pos_mask, "maxmin", positive=True).tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert L.candidate_weights(values, neg_mask, "maxmin", positive=False).tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]


def test_example_without_candidates_gets_zero_weights():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[T, T], [F_, F_]])
    for scheme in L.SCHEMES:
        w = L.candidate_weights(values, mask, scheme, positive=True, scores=torch.full((2, 2), 0.5))
        assert w[1].tolist() == [0.0, 0.0], scheme
        assert w[0].sum().item() == pytest.approx(1.0), scheme


def test_sampling_picks_only_real_candidates_and_both_over_many_draws():
    values = torch.zeros(1, 3)
    mask = torch.tensor([[T, F_, T]])
    g = torch.Generator().manual_seed(0)
    picks = {int(L.candidate_weights(values, mask, "sampling", positive=True, generator=g).argmax()) for _ in range(50)}
    assert picks == {0, 2}


def test_mean_and_wmean_weights():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[T, T, F_]])
    scores = torch.tensor([[0.6, 0.2, 0.9]])
    assert L.candidate_weights(values, mask, "mean", positive=True).tolist()[0] == pytest.approx([0.5, 0.5, 0])
    # positives: w ∝ s = 0.6, 0.2; negatives: w ∝ 1 − s = 0.4, 0.8
    assert L.candidate_weights(values, mask, "wmean", positive=True, scores=scores).tolist()[0] == pytest.approx(
        [0.75, 0.25, 0])
    assert L.candidate_weights(values, mask, "wmean", positive=False, scores=scores).tolist()[0] == pytest.approx(
        [1 / 3, 2 / 3, 0])
    # quality judge off (no scores): wmean is mean
    assert L.candidate_weights(values, mask, "wmean", positive=True).tolist()[0] == pytest.approx([0.5, 0.5, 0])
    with pytest.raises(ValueError, match="minmax"):
        L.candidate_weights(values, mask, "best", positive=True)


def test_positive_and_negative_terms_with_quality_weights_are_detached():
    losses = torch.tensor([[2.0, 1.0, 1.5, 4.0]], requires_grad=True)
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.6]], requires_grad=True)
    pos_mask = torch.tensor([[T, T, F_, F_]])
    neg_mask = ~pos_mask
    w_pos = L.candidate_weights(losses, pos_mask, "minmax", positive=True)
    w_neg = L.candidate_weights(losses, neg_mask, "minmax", positive=False)
    l_pos, s_pos = L.positive_term(losses, w_pos, scores, "minmax")
    l_neg, s_neg = L.negative_term(losses, w_neg, scores, 5.0, "minmax")
    # Eq. 6: s(argmin) · min l = 0.8 · 1.0 ; Eq. 7: (1 − s(argmax)) · min(max l − δ, 0) = 0.4 · (4 − 5)
    assert l_pos.item() == pytest.approx(0.8)
    assert l_neg.item() == pytest.approx(-0.4)
    assert (s_pos.item(), s_neg.item()) == pytest.approx((0.8, 0.6))
    (l_pos - l_neg).sum().backward()
    assert scores.grad is None  # quality weights never train D through L_cl
    assert losses.grad.tolist()[0] == pytest.approx([0.0, 0.8, 0.0, -0.4])


def test_wmean_weights_each_candidate_by_its_quality_once():
    # positives: losses 2, 1 with scores 0.9, 0.6; negatives: losses 1.5, 4 with scores 0.3, 0.6; δ = 3
    losses = torch.tensor([[2.0, 1.0, 1.5, 4.0]], requires_grad=True)
    scores = torch.tensor([[0.9, 0.6, 0.3, 0.6]])
    pos_mask = torch.tensor([[T, T, F_, F_]])
    w_pos = L.candidate_weights(losses, pos_mask, "wmean", positive=True, scores=scores)
    w_neg = L.candidate_weights(losses, ~pos_mask, "wmean", positive=False, scores=scores)
    l_pos, s_pos = L.positive_term(losses, w_pos, scores, "wmean")
    l_neg, s_neg = L.negative_term(losses, w_neg, scores, 3.0, "wmean")
    # l_pos = Σ s·l / Σ s = (0.9·2 + 0.6·1) / 1.5 = 1.6 (the double-weighted Σ s²·l / Σ s gave 1.32)
    assert l_pos.item() == pytest.approx(1.6)
    # l_neg = Σ (1−s)·min(l−δ, 0) / Σ (1−s) = (0.7·(−1.5) + 0.4·0) / 1.1
    assert l_neg.item() == pytest.approx(-1.05 / 1.1)
    # reported scores: the quality-weighted mean score of each side
    assert s_pos.item() == pytest.approx((0.9 * 0.9 + 0.6 * 0.6) / 1.5)
    assert s_neg.item() == pytest.approx((0.7 * 0.3 + 0.4 * 0.6) / 1.1)
    (l_pos - l_neg).sum().backward()
    assert losses.grad.tolist()[0] == pytest.approx([0.6, 0.4, -0.7 / 1.1, 0.0])
    # with every score equal, wmean is exactly mean
    flat = torch.full((1, 4), 0.5)
    w_mean = L.candidate_weights(losses, pos_mask, "mean", positive=True)
    w_flat = L.candidate_weights(losses, pos_mask, "wmean", positive=True, scores=flat)
    assert L.positive_term(losses, w_flat, flat, "wmean")[0].item() == pytest.approx(1.5)
    assert L.positive_term(losses, w_mean, flat, "mean")[0].item() == pytest.approx(0.5 * 1.5)


def test_quality_judge_off_is_plain_min_and_max():
    losses = torch.tensor([[2.0, 1.0, 1.5, 2.5]])
    pos_mask = torch.tensor([[T, T, F_, F_]])
    w_pos = L.candidate_weights(losses, pos_mask, "minmax", positive=True)
    w_neg = L.candidate_weights(losses, ~pos_mask, "minmax", positive=False)
    l_pos, s_pos = L.positive_term(losses, w_pos, None, "minmax")
    l_neg, s_neg = L.negative_term(losses, w_neg, None, 3.0, "minmax")
    assert l_pos.item() == 1.0 and s_pos.item() == 1.0
    assert l_neg.item() == pytest.approx(2.5 - 3.0) and s_neg.item() == 0.0


def test_contrastive_loss_means_over_examples_with_a_positive():
    l_pos = torch.tensor([1.0, 2.0, 7.0])
    l_neg = torch.tensor([-1.0, 0.0, -5.0])
    has_pos = torch.tensor([T, T, F_])  # the third keeps only its label task
    has_neg = torch.tensor([T, F_, T])
    # ((1 − 0.2·(−1)) + 2) / 2
    assert L.contrastive_loss(l_pos, l_neg, has_pos, has_neg, beta=0.2).item() == pytest.approx(1.6)
    none = L.contrastive_loss(l_pos, l_neg, torch.zeros(3, dtype=torch.bool), has_neg, beta=0.2)
    assert none.item() == 0.0


def test_discriminator_loss_as_printed():
    scores = torch.tensor([[0.9, 0.7, 0.2, 0.0], [0.5, 0.1, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]], requires_grad=True)
    pos_mask = torch.tensor([[T, T, F_, F_], [T, F_, F_, F_], [T, F_, F_, F_]])
    neg_mask = torch.tensor([[F_, F_, T, F_], [F_, T, F_, F_], [F_, F_, F_, F_]])  # example 3: no negative
    first = -math.log((math.exp(0.9) + math.exp(0.7)) / math.exp(0.2))
    second = -math.log(math.exp(0.5) / math.exp(0.1))
    l_d = L.discriminator_loss(scores, pos_mask, neg_mask)
    assert l_d.item() == pytest.approx((first + second) / 2, rel=1e-5)
    l_d.backward()
    assert scores.grad[2].abs().sum().item() == 0.0  # excluded example, masked slots: no gradient
    assert scores.grad[0, 3].item() == 0.0
    assert scores.grad[0, 0].item() < 0 < scores.grad[0, 2].item()  # raise positives, lower negatives
    empty = L.discriminator_loss(scores, pos_mask, torch.zeros_like(neg_mask))
    assert empty.item() == 0.0


def test_total_loss_and_alpha3_decay():
    assert L.total_loss(torch.tensor(2.0), torch.tensor(4.0), torch.tensor(-1.0), 0.5, 0.5, 0.25).item() == 2.75
    assert L.alpha3_at_round(0.5, 0.9, 0) == 0.5
    assert L.alpha3_at_round(0.5, 0.9, 3) == pytest.approx(0.5 * 0.9**3)
    with pytest.raises(ValueError):
        L.alpha3_at_round(0.5, 0.9, -1)


def test_margin_on_the_sequence_sum_lets_a_near_copy_reach_delta():
    """loss.margin_reduction: sum compares δ with l·|r| and keeps the term in per-token units: a 30-token near
    copy at token-mean 0.2 (sum 6) is beyond δ = 3 under sum and far inside it under mean (the spec)."""
    losses = torch.tensor([[0.2, 0.05, 4.0]], requires_grad=True)
    n_tokens = torch.tensor([[30.0, 30.0, 2.0]])
    spec = L.margin(losses, 3.0)
    assert spec[0].tolist() == pytest.approx([-2.8, -2.95, 0.0])
    summed = L.margin(losses, 3.0, n_tokens)
    # min(l·|r| − δ, 0) / |r|: 0 for 6 − 3 > 0; (1.5 − 3) / 30 = −0.05; the 2-token 8.0 − 3 > 0
    assert summed[0].tolist() == pytest.approx([0.0, -0.05, 0.0])
    summed.sum().backward()
    assert losses.grad.tolist() == [[0.0, 1.0, 0.0]]  # inside the margin the gradient is the spec's
    assert L.beyond_margin(losses, 3.0).tolist() == [[F_, F_, T]]
    assert L.beyond_margin(losses, 3.0, n_tokens).tolist() == [[T, F_, T]]
    # the mean reduction is the default: the negative term without n_tokens equals the spec's margin
    w = torch.tensor([[0.0, 1.0, 0.0]])
    assert L.negative_term(losses, w, None, 3.0, "minmax")[0].item() == pytest.approx(-2.95)
    assert L.negative_term(losses, w, None, 3.0, "minmax", n_tokens)[0].item() == pytest.approx(-0.05)


def test_max_within_margin_picks_the_worst_negative_that_still_has_a_gradient():
    """loss.negative_pick: the max-loss negative (spec) is babble beyond δ in row 0, so the spec's pick has no
    gradient there; max_within_margin takes the highest-loss negative still below δ. A row whose negatives are all
    beyond δ keeps the plain max; masked-out candidates are never picked."""
    values = torch.tensor([[9.0, 2.5, 1.0, 2.9], [5.0, 4.0, 0.0, 0.0], [1.0, 2.0, 0.5, 0.0]])
    mask = torch.tensor([[T, T, T, F_], [T, T, F_, F_], [T, T, F_, F_]])
    within = ~L.beyond_margin(values, 3.0)
    spec = L.candidate_weights(values, mask, "minmax", positive=False)
    assert spec.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    pick = L.candidate_weights(values, mask, "minmax", positive=False, within=within)
    assert pick.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    # positives (min) are untouched by the switch
    assert torch.equal(L.candidate_weights(values, mask, "minmax", positive=True, within=within),
                       L.candidate_weights(values, mask, "minmax", positive=True))
    has_neg = mask.any(dim=1)
    assert L.beyond_margin_share(values, spec, has_neg, 3.0).item() == pytest.approx(2 / 3)
    assert L.beyond_margin_share(values, pick, has_neg, 3.0).item() == pytest.approx(1 / 3)


def test_neg_beyond_margin_share_counts_examples_with_a_negative_only():
    values = torch.tensor([[4.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    has_neg = torch.tensor([T, T, F_])
    assert L.beyond_margin_share(values, weights, has_neg, 3.0).item() == pytest.approx(0.5)
    assert L.beyond_margin_share(values[:, :0], weights[:, :0], torch.tensor([F_, F_, F_]), 3.0).item() == 0.0


def test_the_loss_switches_are_off_by_default_and_need_minmax():
    from qcrd_ray.config import Config, ConfigError

    lc = Config().loss
    assert (lc.margin_reduction, lc.negative_pick, lc.dss_rationale) == ("mean", "max", "first")
    assert Config().replace(loss={"negative_pick": "max_within_margin"}).loss.scheme == "minmax"
    with pytest.raises(ConfigError, match="loss.negative_pick"):
        Config().replace(loss={"negative_pick": "max_within_margin", "scheme": "mean"})
