"""QCRD losses (paper Eq. 2-8; docs/design.md, "The algorithm") as pure functions of tensors.

Candidate rationales of a batch are ragged (each example has its own number of positives and negatives), so the
per-candidate quantities come as padded ``[B, C]`` tensors with a boolean ``mask`` marking the real candidates.

Many-to-one schemes (paper Table 5) all reduce to a per-candidate weight ``w`` over an example's candidates:
``minmax`` (the paper: min loss over positives, max over negatives), ``maxmin`` (the reverse), ``sampling`` (one
candidate drawn uniformly), ``mean`` (uniform weights) and ``wmean`` (weights from the detached quality scores,
normalised: positives ``w ∝ s``, negatives ``w ∝ 1 − s``, so better positives and worse negatives count more; with
the quality judge off both reduce to ``mean``). One-hot schemes select a single candidate, which lets the training
step give gradient to that candidate only (``qcrd/step.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
SCHEMES = ("minmax", "maxmin", "sampling", "mean", "wmean")
ONE_HOT_SCHEMES = ("minmax", "maxmin", "sampling")


def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of each sequence, ``l(x, r) = −(1/|r|) Σ_t log p(r_t | r_<t, x)``.

    ``logits`` ``[N, T, V]``, ``labels`` ``[N, T]`` with ``-100`` on padding; returns ``[N]``. A sequence with no
    target token has loss 0 (it carries no signal, and 0/0 would poison the batch with NaN).
    """
    # flat [N·T, V] rows: the class-dim-1 layout of a transposed [N, V, T] view ran 4-5× slower on CPU (fwd + bwd)
    token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    n_tokens = (labels != IGNORE_INDEX).sum(dim=1)
    return token.sum(dim=1) / n_tokens.clamp(min=1)


def margin_threshold(delta: float, n_tokens: torch.Tensor | None = None) -> torch.Tensor | float:
    """The per-token loss at which a negative reaches the margin: δ (``loss.margin_reduction: mean``, the spec:
    δ against the token-mean CE ``l``) or ``δ / |r|`` per candidate (``sum``: δ against the sequence-sum CE
    ``l·|r|``, so a near copy of a positive, one token off, can reach it). ``n_tokens``: ``|r|`` of each candidate
    (None: mean)."""
    return delta if n_tokens is None else delta / n_tokens.clamp(min=1).to(torch.float32)


def margin(losses: torch.Tensor, delta: float, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The negative margin of Eq. 7, ``min(l(x, r) − δ, 0)``: a negative whose loss already exceeds δ gives no
    gradient, so the student is not pushed to make bad rationales infinitely unlikely. With ``n_tokens`` (margin
    on the sequence sum) ``min(l·|r| − δ, 0) / |r|``: the same per-token units and gradient inside the margin."""
    return torch.clamp(losses - margin_threshold(delta, n_tokens), max=0.0)


def beyond_margin(losses: torch.Tensor, delta: float, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Whether each candidate's loss is beyond the margin (bool, same shape): its margin term has no gradient."""
    return losses.detach() > margin_threshold(delta, n_tokens)


def beyond_margin_share(losses: torch.Tensor, weights: torch.Tensor, has_neg: torch.Tensor, delta: float,
                        n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """``neg_beyond_margin_share``: over the examples with a negative, the share whose chosen negative is beyond
    the margin (one-hot schemes; with spread weights, the weight on negatives beyond it). 0 without negatives."""
    beyond = (weights.detach() * beyond_margin(losses, delta, n_tokens).to(weights.dtype)).sum(dim=1)
    valid = has_neg.to(beyond.dtype)
    return (beyond * valid).sum() / valid.sum().clamp(min=1.0)


def candidate_weights(
    values: torch.Tensor,
    mask: torch.Tensor,
    scheme: str,
    *,
    positive: bool,
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    multiplicity: torch.Tensor | None = None,
    within: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-candidate weights ``w`` ``[B, C]`` of a many-to-one scheme; each row sums to 1 (0 for a row with no
    candidate). ``values`` are the candidates' (detached) losses, ``scores`` their detached D scores (``wmean``).

    ``within`` ``[B, C]`` bool (``loss.negative_pick: max_within_margin``): where a scheme takes a max, it takes
    it over the candidates marked within the margin when a row has any, so the pick keeps a gradient; a row with
    none takes the plain max.

    Eq. 4-5 take ``min_{r ∈ P}`` over positives and ``max_{r ∈ N}`` over negatives (``minmax``, which Eq. 6-7
    weigh by D's scores); selection is on the raw loss ``l`` (the margin is monotone, so the max of
    ``min(l − δ, 0)`` is attained at the max of ``l``).

    ``multiplicity`` ``[B, C]``: how many identical copies each (deduplicated) candidate stands for. min/max ignore
    it (exact); ``mean``/``wmean`` weigh each candidate by it and ``sampling`` draws in proportion to it
    (``argmax u^(1/w)``), as over the undeduplicated list.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown many-to-one scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    values = values.detach()
    maskf = mask.to(values.dtype)
    has_any = mask.any(dim=1, keepdim=True)
    if scheme in ONE_HOT_SCHEMES:
        if scheme == "sampling":
            noise = torch.rand(values.shape, generator=generator, device="cpu").to(values.device)
            if multiplicity is not None:
                noise = noise ** (1.0 / multiplicity.clamp(min=1.0))
            index = noise.masked_fill(~mask, -1.0).argmax(dim=1)
        else:
            take_min = (scheme == "minmax") == positive
            if take_min:
                index = values.masked_fill(~mask, float("inf")).argmin(dim=1)
            else:
                pool = mask
                if within is not None:
                    inside = mask & within
                    pool = torch.where(inside.any(dim=1, keepdim=True), inside, mask)
                index = values.masked_fill(~pool, float("-inf")).argmax(dim=1)
        return F.one_hot(index, values.shape[1]).to(values.dtype) * has_any.to(values.dtype)
    if multiplicity is not None:
        maskf = maskf * multiplicity
    if scheme == "mean" or scores is None:
        raw = maskf
    else:
        quality = scores.detach() if positive else 1.0 - scores.detach()
        raw = quality.clamp(min=1e-6) * maskf
    return raw / raw.sum(dim=1, keepdim=True).clamp(min=1e-12)


def positive_term(
    losses: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor | None, scheme: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6, ``l_pos_i = s_pos_i · min_{r ∈ P_i} l(x_i, r)`` with ``s_pos_i = D(x_i, argmin r)`` detached, in its
    many-to-one form ``Σ_c w_c · s_c · l_c``. ``scores`` None = quality judge off (``s ≡ 1``). Under ``wmean``
    the weights already are ``s_c / Σ s``, so the term is ``Σ_c w_c · l_c`` (multiplying by ``s_c`` again would
    weight by ``s²``).

    Returns ``(l_pos [B], s_pos [B])`` where ``s_pos`` is the weighted (detached) score ``Σ_c w_c · s_c``.
    """
    s = torch.ones_like(losses) if scores is None else scores.detach()
    factor = torch.ones_like(s) if scheme == "wmean" else s
    return (weights * factor * losses).sum(dim=1), (weights * s).sum(dim=1).detach()


def negative_term(
    losses: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor | None, delta: float, scheme: str,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 with the margin, ``l_neg_i = (1 − s_neg_i) · max_{r ∈ N_i} min(l(x_i, r) − δ, 0)`` with
    ``s_neg_i = D(x_i, argmax r)`` detached, in its many-to-one form ``Σ_c w_c · (1 − s_c) · min(l_c − δ, 0)``
    (``wmean``: ``Σ_c w_c · min(l_c − δ, 0)``, its weights already being ``(1 − s_c) / Σ (1 − s)``).
    ``scores`` None = quality judge off (``s_neg ≡ 0``). ``n_tokens`` ``[B, C]``: the margin on the sequence sum
    (:func:`margin`). Returns ``(l_neg [B], s_neg [B])``.
    """
    s = torch.zeros_like(losses) if scores is None else scores.detach()
    factor = torch.ones_like(s) if scheme == "wmean" else 1.0 - s
    return (weights * factor * margin(losses, delta, n_tokens)).sum(dim=1), (weights * s).sum(dim=1).detach()


def contrastive_loss(
    l_pos: torch.Tensor, l_neg: torch.Tensor, has_pos: torch.Tensor, has_neg: torch.Tensor, beta: float
) -> torch.Tensor:
    """Eq. 3, ``L_cl = mean_i [ l_pos_i − β · l_neg_i ]``.

    The mean runs over the examples with at least one positive: an example without a positive keeps only its
    label task (docs/design.md, "The algorithm"), and one without a negative keeps only ``l_pos``. A batch in which no example has a
    positive gives 0 (still attached to the graph, so DDP sees every parameter used).
    """
    valid = has_pos.to(l_pos.dtype)
    per_example = l_pos - beta * l_neg * has_neg.to(l_neg.dtype)
    return (per_example * valid).sum() / valid.sum().clamp(min=1.0)


def discriminator_loss(
    scores: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor, multiplicity: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 2 as printed, ``L_D = mean_i [ −log( Σ_{r ∈ P_i} exp(s(x_i, r)) / Σ_{r ∈ N_i} exp(s(x_i, r)) ) ]``.

    ``scores`` ``[B, C]`` are D's outputs with gradient; ``pos_mask``/``neg_mask`` mark each example's positives
    and negatives among them. The ratio is undefined without both kinds, so the mean runs over the examples that
    have at least one positive and one negative; a batch with none gives 0 (attached to the graph). Since
    ``s ∈ (0, 1)`` the loss is bounded in ``(−1 − log|P|+log|N|, 1 − log|P|+log|N|)``. ``multiplicity``: copies
    each deduplicated pair stands for, ``Σ exp(s)`` over copies = ``exp(s + log w)`` (exact). Computed in fp32.
    """
    scores = scores.float()
    if multiplicity is not None:
        scores = scores + torch.log(multiplicity.float().clamp(min=1.0))
    neg_inf = torch.finfo(scores.dtype).min
    log_pos = torch.logsumexp(scores.masked_fill(~pos_mask, neg_inf), dim=1)
    log_neg = torch.logsumexp(scores.masked_fill(~neg_mask, neg_inf), dim=1)
    valid = (pos_mask.any(dim=1) & neg_mask.any(dim=1)).to(scores.dtype)
    per_example = torch.where(valid.bool(), log_neg - log_pos, torch.zeros_like(log_pos))
    return (per_example * valid).sum() / valid.sum().clamp(min=1.0)


def total_loss(
    l_pred: torch.Tensor, l_cl: torch.Tensor, l_d: torch.Tensor, alpha1: float, alpha2: float, alpha3: float
) -> torch.Tensor:
    """Eq. 8, ``L_total = α1 · L_pred + α2 · L_cl + α3 · L_D``."""
    return alpha1 * l_pred + alpha2 * l_cl + alpha3 * l_d


def alpha3_at_round(alpha3: float, decay: float, round_index: int) -> float:
    """α3 after ``round_index`` completed rounds: α3 ← decay · α3 at each round end, i.e. ``α3 · decay^round``."""
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    return alpha3 * decay**round_index
