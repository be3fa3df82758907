"""One training step of any method (no Ray): collate teacher rows, compute the losses.

The method is ``cfg.train.method``; whether it has D is its spec (qcrd_ray/methods.py), what it trains on its
registered targets (qcrd/targets.py) and how its loss is composed the function registered here under its name
(``@register_loss``).
``make_batch`` turns TEACHER_SCHEMA rows (optionally with ``student_negatives`` and ``negative_round``) into padded
tensors, with the explain targets of ``qcrd/targets.py``; ``DistillModel`` holds the student and, when the method
needs one, the discriminator D, so one DDP wrapper syncs both; ``DistillModel(batch, alpha3)`` returns the step's
loss and metrics.

Everything that depends on the student's architecture goes through its family (qcrd_ray/students/): how prompts
and targets become tensors, and the losses of targets given prompts.

QCRD's fast path (one-hot many-to-one schemes): the ``explain:`` prompt runs once per example with gradient (a
seq2seq student's encoder; a causal student's prompt pass, whose keys and values every candidate shares); every
candidate rationale is scored without gradient over those shared prompt states; the scheme selects one positive
and one negative per example, and only those two get a forward/backward with gradient, through the shared states. ``mean``/``wmean`` weight every candidate, so all of them are decoded
with gradient (the encoder still runs once). ``naive=True`` is the reference: every candidate through the full
model with gradient; it gives the same loss value (see tests/test_step.py) at several times the cost.

Cost options (config keys; docs/design.md "QCRD step cost"): ``train.dedup_candidates`` keeps one copy of identical
candidate texts of an example with its multiplicity (``cand_mult``), exact for min/max and weighted elsewhere;
``train.precision: bf16`` autocasts the student and D (losses in fp32); ``train.score_chunk_mb`` bounds the no-grad
scoring's logits; ``discriminator.pairs_per_step`` gives L_D gradient on a uniform sample of examples only (the
other examples' selected candidates are scored without gradient, for their detached weights);
:func:`accumulate` runs ``train.grad_accum_steps`` micro-batches per optimizer step.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from qcrd_ray.config import Config
from qcrd_ray.data import prompts
from qcrd_ray.methods import method_spec
from qcrd_ray.qcrd import losses as L
from qcrd_ray.qcrd.discriminator import Discriminator, encode_pairs, precision_context
from qcrd_ray.qcrd.targets import candidate_targets
from qcrd_ray.students import PromptStates, StudentFamily, family_of, resolve_family


@dataclass
class Batch:
    """Padded tensors of one batch. Candidates (rationales) are flattened over the batch: candidate ``m`` belongs
    to example ``cand_example[m]`` and sits in column ``cand_slot[m]`` of that example's ``[B, C]`` grid."""

    method: str  # the spec name it was collated for
    pred_ids: torch.Tensor  # [B, Lx] "predict: x" (padded on the family's side)
    pred_mask: torch.Tensor
    pred_labels: torch.Tensor  # [B, Ly] label tokens, -100 on padding
    expl_ids: torch.Tensor | None = None  # [B, Lx] "explain: x"
    expl_mask: torch.Tensor | None = None
    cand_labels: torch.Tensor | None = None  # [M, Lr] explain targets, -100 on padding
    cand_example: torch.Tensor | None = None  # [M] long
    cand_slot: torch.Tensor | None = None  # [M] long
    cand_positive: torch.Tensor | None = None  # [M] bool (False = negative)
    cand_mult: torch.Tensor | None = None  # [M] float: copies of this text among the example's (same-kind) candidates
    disc_ids: torch.Tensor | None = None  # [M, Ld] D inputs "question: x rationale: r" (when the method needs D)
    disc_mask: torch.Tensor | None = None
    n_slots: int = 0  # C
    negative_rounds: list = field(default_factory=list)  # per example: round its student negative came from

    @property
    def size(self) -> int:
        return self.pred_ids.shape[0]

    def to(self, device) -> "Batch":
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


@dataclass
class StepOutput:
    loss: torch.Tensor
    # the step's metrics as detached 0-dim tensors (or Python numbers): reading one waits for the device, so the
    # train loop reads them once per train.log_every, after the all-reduce, as nanoGPT calls .item()
    tensors: dict

    @property
    def metrics(self) -> dict:
        """The metrics as Python floats, read now (one device sync): for a one-off read such as a test's."""
        return metric_values(self.tensors)


def metric_values(metrics: dict) -> dict:
    """``metrics`` with its tensors read as Python floats in one device sync (float64: exactly the float32 value, as
    ``.item()`` gave it)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].detach().double() for k in keys]).tolist() if keys else []
    return {**metrics, **dict(zip(keys, values))}


def make_batch(rows: Sequence[Mapping], tokenizer, cfg: Config, family: StudentFamily | None = None) -> Batch:
    """Collate TEACHER_SCHEMA rows into a :class:`Batch` for ``cfg.train.method``, encoded by the student's
    ``family`` (default: the config's ``student.family``)."""
    spec = method_spec(cfg)
    if not rows:
        raise ValueError("make_batch: empty batch")
    s = cfg.student
    family = family or resolve_family(s)

    def inputs(mode):
        texts = [family.prompt(tokenizer, prompts.student_input(mode, r["input"])) for r in rows]
        return family.encode_prompts(tokenizer, texts, s.max_input_len)

    pred_ids, pred_mask = inputs("predict")
    batch = Batch(spec.name, pred_ids, pred_mask,
                  family.encode_targets(tokenizer, [r["label"] for r in rows], s.max_target_len),
                  negative_rounds=[r.get("negative_round") for r in rows])
    if not spec.explains:
        return batch
    batch.expl_ids, batch.expl_mask = inputs("explain")
    texts, example, slot, positive, mult, questions = [], [], [], [], [], []
    for i, row in enumerate(rows):
        pos, neg = candidate_targets(row, cfg)
        cands = [((t, True), 1) for t in pos] + [((t, False), 1) for t in neg]
        if cfg.train.dedup_candidates:  # first occurrence order; a text that is both kinds stays twice
            counts: dict = {}
            for key, _ in cands:
                counts[key] = counts.get(key, 0) + 1
            cands = list(counts.items())
        for c, ((text, is_pos), count) in enumerate(cands):
            texts.append(text)
            example.append(i)
            slot.append(c)
            positive.append(is_pos)
            mult.append(float(count))
            questions.append(row["input"])
    batch.cand_example = torch.tensor(example, dtype=torch.long)
    batch.cand_slot = torch.tensor(slot, dtype=torch.long)
    batch.cand_positive = torch.tensor(positive, dtype=torch.bool)
    batch.cand_mult = torch.tensor(mult, dtype=torch.float32)
    batch.n_slots = max(slot) + 1 if slot else 0
    batch.cand_labels = (family.encode_targets(tokenizer, texts, s.max_target_len) if texts
                         else torch.full((0, 1), L.IGNORE_INDEX, dtype=torch.long))
    if spec.needs_discriminator(cfg) and texts:
        # under share_question_states D reads the rationale alone; the question's states come from the step
        enc = encode_pairs(tokenizer, questions, texts, s.max_input_len, cfg.discriminator.share_question_states,
                           family)
        batch.disc_ids, batch.disc_mask = enc["input_ids"], enc["attention_mask"]
    return batch


class DistillModel(nn.Module):
    """The student and (when ``cfg.train.method`` needs one) D as one module; ``forward(batch, alpha3)``."""

    def __init__(self, student: nn.Module, disc: Discriminator | None, cfg: Config,
                 *, naive: bool = False, score_chunk: int | None = None):
        super().__init__()
        self.spec = method_spec(cfg)
        needs_disc = self.spec.needs_discriminator(cfg)
        if needs_disc and disc is None:
            raise ValueError(f"{self.spec.name} with loss.quality_judge on needs a discriminator")
        self.student = student
        self.family = family_of(student)
        self.disc = disc if needs_disc else None
        self.cfg = cfg
        self.naive = naive  # reference path: every candidate through the full model with gradient
        self.score_chunk = score_chunk  # candidates per no-grad scoring chunk; None: sized by train.score_chunk_mb
        self.generator = torch.Generator().manual_seed(cfg.train.seed)  # the `sampling` scheme's draws
        self.d_generator = torch.Generator().manual_seed(cfg.train.seed + 1)  # discriminator.pairs_per_step's draws

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The step's own random streams, which a checkpoint saves and a resume restores with the global ones."""
        return {"sampling": self.generator, "pairs": self.d_generator}

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups: the student at the optimizer's lr, D's own parameters (not a shared
        encoder) at ``discriminator.lr``."""
        student = [p for p in self.student.parameters() if p.requires_grad]  # under LoRA: the adapters only
        if self.disc is None:
            return [{"params": student}]
        seen = {id(p) for p in self.student.parameters()}
        own = [p for p in self.disc.parameters() if id(p) not in seen and p.requires_grad]
        return [{"params": student}, {"params": own, "lr": self.cfg.discriminator.lr}]

    # ---- building blocks (also timed one by one by benchmarks/train_step.py)

    def label_loss(self, batch: Batch) -> torch.Tensor:
        """L_pred: mean over examples of the token-mean CE of the label given ``predict: x``."""
        logits = self.family.target_logits(self.student, batch.pred_ids, batch.pred_mask, batch.pred_labels)
        return L.sequence_ce(logits, batch.pred_labels).mean()

    def encode_explain(self, batch: Batch) -> PromptStates:
        """The shared states of ``explain: x``, once per example (``hidden`` ``[B, Lx, d]``)."""
        return self.family.encode_prompt(self.student, batch.expl_ids, batch.expl_mask)

    def decode_losses(self, batch: Batch, states: PromptStates, which: torch.Tensor) -> torch.Tensor:
        """``l(x, r)`` of the candidates ``which`` (flat indices), over the shared prompt states."""
        labels = batch.cand_labels[which]
        logits = self.family.candidate_logits(self.student, states.select(batch.cand_example[which]), labels)
        return L.sequence_ce(logits, labels)

    def chunk_size(self, batch: Batch) -> int:
        """Candidates per no-grad scoring chunk: ``score_chunk`` when given, else as many as fit the memory of
        ``train.score_chunk_mb`` (0: a quarter of the device's free memory on GPU, 256 MiB on CPU), counting the
        fp32 logits and their log-softmax, ``2 × T × vocab × 4`` bytes per candidate."""
        if self.score_chunk:
            return self.score_chunk
        device = batch.cand_labels.device
        if self.cfg.train.score_chunk_mb:
            budget = self.cfg.train.score_chunk_mb * 2**20
        elif device.type == "cuda":
            budget = torch.cuda.mem_get_info(device)[0] // 4
        else:
            budget = 256 * 2**20
        per_candidate = 2 * 4 * max(batch.cand_labels.shape[1], 1) * self.student.config.vocab_size
        return max(1, budget // per_candidate)

    @torch.no_grad()
    def score_candidates(self, batch: Batch, states: PromptStates) -> torch.Tensor:
        """``l(x, r)`` of every candidate without gradient, in chunks (``chunk_size``): ``[M]``."""
        m, chunk = batch.cand_labels.shape[0], self.chunk_size(batch)
        device = batch.cand_labels.device
        return torch.cat([self.decode_losses(batch, states, torch.arange(i, min(i + chunk, m), device=device))
                          for i in range(0, m, chunk)])

    def naive_losses(self, batch: Batch) -> torch.Tensor:
        """Reference: each candidate through the full model (its own prompt pass) with gradient: ``[M]``."""
        ex = batch.cand_example
        logits = self.family.target_logits(self.student, batch.expl_ids[ex], batch.expl_mask[ex], batch.cand_labels)
        return L.sequence_ce(logits, batch.cand_labels)

    def disc_scores(self, batch: Batch, states: PromptStates | None = None,
                    which: torch.Tensor | None = None) -> torch.Tensor:
        """D's score of the pairs ``which`` (default every pair), with gradient. ``states``: the student's states of
        ``explain: x`` (needed, and used detached, under share_question_states)."""
        which = torch.arange(batch.disc_ids.shape[0], device=batch.disc_ids.device) if which is None else which
        question = qmask = None
        if self.disc.shares_question_states:
            ex = batch.cand_example[which]
            states = self.encode_explain(batch) if states is None else states
            question, qmask = states.hidden.detach().index_select(0, ex), states.mask.index_select(0, ex)
        return self.disc(batch.disc_ids[which], batch.disc_mask[which], question, qmask)

    def d_sample(self, batch: Batch, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
        """Examples whose pairs carry L_D with gradient ``[B]`` bool: all of them, or under
        ``discriminator.pairs_per_step`` a uniform sample without replacement of k of the examples with both kinds,
        k = pairs_per_step / their mean number of pairs (at least 1). Eq. 2 is a log of sums over an example's
        pairs, so whole examples are drawn: the mean over the sample is then unbiased for the mean over examples."""
        valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
        budget = self.cfg.discriminator.pairs_per_step
        n_valid = int(valid.sum())
        if not budget:  # the spec: every pair (L_D itself keeps only examples with both kinds)
            return torch.ones_like(valid)
        if not n_valid:
            return valid
        per_example = float((pos_mask | neg_mask)[valid].sum()) / n_valid
        k = min(n_valid, max(1, int(budget / per_example)))
        chosen = valid.nonzero().squeeze(1)[torch.randperm(n_valid, generator=self.d_generator)[:k].to(valid.device)]
        return torch.zeros_like(valid).index_fill(0, chosen, True)

    def d_weight_scores(self, batch: Batch, states, grad_rows: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """``[M]`` D scores: with gradient on the candidates of ``grad_rows``, without gradient on the other
        candidates in ``need`` (their scores only weight the student's terms), 0 elsewhere."""
        grad = grad_rows[batch.cand_example]
        rest = need & ~grad
        if bool(grad.all()):
            return self.disc_scores(batch, states)
        m = batch.cand_example.shape[0]
        flat = torch.zeros(m, device=batch.cand_example.device)
        idx = torch.arange(m, device=flat.device)
        if bool(rest.any()):
            with torch.no_grad():
                flat = flat.index_put((idx[rest],), self.disc_scores(batch, states, idx[rest]))
        if bool(grad.any()):
            flat = flat.index_put((idx[grad],), self.disc_scores(batch, states, idx[grad]))
        return flat

    # ---- the step

    def to_grid(self, batch: Batch, flat: torch.Tensor) -> torch.Tensor:
        """Per-candidate values ``[M]`` laid out per example, ``[B, C]`` (zeros where an example has fewer)."""
        grid = flat.new_zeros(batch.size, batch.n_slots)
        return grid.index_put((batch.cand_example, batch.cand_slot), flat)

    def forward(self, batch: Batch, alpha3: float | None = None) -> StepOutput:
        if batch.method != self.spec.name:
            raise ValueError(f"batch was made for {batch.method!r}, model runs {self.spec.name!r}")
        with precision_context(self.cfg.train.precision, batch.pred_ids.device.type):
            return self._forward(batch, alpha3)

    def _forward(self, batch: Batch, alpha3: float | None) -> StepOutput:
        return LOSSES[self.spec.name](self, batch, self.label_loss(batch),
                                      self.cfg.loss.alpha3 if alpha3 is None else alpha3)

    def weights(self, loss_grid, pos_mask, neg_mask, s_grid, mult):
        """The scheme's (loss.scheme) per-candidate weights of the positives and of the negatives."""
        scheme = self.cfg.loss.scheme
        w_pos = L.candidate_weights(loss_grid, pos_mask, scheme, positive=True, scores=s_grid,
                                    generator=self.generator, multiplicity=mult)
        w_neg = L.candidate_weights(loss_grid, neg_mask, scheme, positive=False, scores=s_grid,
                                    generator=self.generator, multiplicity=mult)
        return w_pos, w_neg


# method name -> how its step composes the loss: fn(model, batch, l_pred, alpha3) -> StepOutput
LOSSES: dict[str, Callable[[DistillModel, Batch, torch.Tensor, float], StepOutput]] = {}


def register_loss(method: str):
    """Decorator: ``fn(model, batch, l_pred, alpha3) -> StepOutput`` is ``method``'s loss, given its label loss."""

    def register(fn):
        LOSSES[method] = fn
        return fn

    return register


@register_loss("finetune")
def finetune_loss(model: DistillModel, batch: Batch, l_pred: torch.Tensor, alpha3: float) -> StepOutput:
    """L_pred alone."""
    return StepOutput(l_pred, {"loss": l_pred.detach(), "l_pred": l_pred.detach(), "l_rationale": 0.0})


@register_loss("dss")
def dss_loss(model: DistillModel, batch: Batch, l_pred: torch.Tensor, alpha3: float) -> StepOutput:
    """Distilling step-by-step: L_pred + loss.dss_lambda · CE of the one rationale of each example."""
    if batch.cand_labels.shape[0]:
        states = model.encode_explain(batch)
        l_rat = model.decode_losses(batch, states, torch.arange(batch.cand_labels.shape[0],
                                                               device=states.hidden.device)).mean()
    else:
        l_rat = l_pred * 0.0
    loss = l_pred + model.cfg.loss.dss_lambda * l_rat
    return StepOutput(loss, {"loss": loss.detach(), "l_pred": l_pred.detach(), "l_rationale": l_rat.detach()})


@register_loss("qcrd")
def qcrd_loss(model: DistillModel, batch: Batch, l_pred: torch.Tensor, alpha3: float) -> StepOutput:
    """QCRD (Eq. 8): α1·L_pred + α2·L_cl + α3·L_D over the batch's candidates (see the module docstring for the
    fast path and the cost options)."""
    lc = model.cfg.loss
    m = batch.cand_labels.shape[0]
    device = l_pred.device
    pos_mask = (model.to_grid(batch, batch.cand_positive) if m
                else torch.zeros(batch.size, 0, dtype=torch.bool, device=device))
    neg_mask = model.to_grid(batch, ~batch.cand_positive) if m else pos_mask
    mult = model.to_grid(batch, batch.cand_mult) if m else None
    # loss.margin_reduction sum: δ against each candidate's sequence-sum CE, which needs its length |r|
    n_tok = (model.to_grid(batch, (batch.cand_labels != L.IGNORE_INDEX).sum(dim=1).float())
             if m and lc.margin_reduction == "sum" else None)
    zero = l_pred * 0.0
    one_hot = lc.scheme in L.ONE_HOT_SCHEMES

    def weights(grid):  # the scheme's weights; loss.negative_pick max_within_margin: the max still below δ
        w_pos, w_neg = model.weights(grid, pos_mask, neg_mask, s_grid, mult)
        if lc.negative_pick == "max_within_margin":
            w_neg = L.candidate_weights(grid, neg_mask, lc.scheme, positive=False, multiplicity=mult,
                                        within=~L.beyond_margin(grid, lc.delta, n_tok))
        return w_pos, w_neg

    use_d = model.disc is not None and m > 0
    d_rows = model.d_sample(batch, pos_mask, neg_mask) if use_d else None
    all_idx = torch.arange(m, device=device)
    states = None
    if m and not model.naive:
        states = model.encode_explain(batch)
    elif use_d and model.disc.shares_question_states:
        with torch.no_grad():
            states = model.encode_explain(batch)
    # mean/wmean weight every candidate by its score, so D scores them all before the weights; one-hot schemes
    # select on the losses alone, and only the selected candidates' scores are needed outside d_rows
    s_flat = model.d_weight_scores(batch, states, d_rows, all_idx >= 0) if (use_d and not one_hot) else None
    s_grid = model.to_grid(batch, s_flat) if s_flat is not None else None
    if m and model.naive:
        loss_grid = model.to_grid(batch, model.naive_losses(batch))
        w_pos, w_neg = weights(loss_grid)
    elif m:
        if one_hot:
            w_pos, w_neg = weights(model.to_grid(batch, model.score_candidates(batch, states)))
            which = all_idx[(w_pos + w_neg)[batch.cand_example, batch.cand_slot] > 0]
        else:
            which = all_idx
        loss_grid = model.to_grid(batch, zero.expand(m).clone().index_put(
            (which,), model.decode_losses(batch, states, which)))
        if not one_hot:
            w_pos, w_neg = weights(loss_grid)
    else:
        loss_grid = zero.expand(batch.size, 0)
        w_pos = w_neg = loss_grid.detach()
    if use_d and one_hot:
        chosen = (w_pos + w_neg)[batch.cand_example, batch.cand_slot] > 0
        s_grid = model.to_grid(batch, model.d_weight_scores(batch, states, d_rows, chosen))
    l_pos, s_pos = L.positive_term(loss_grid, w_pos, s_grid, lc.scheme)
    l_neg, s_neg = L.negative_term(loss_grid, w_neg, s_grid, lc.delta, lc.scheme, n_tok)
    has_pos, has_neg = pos_mask.any(dim=1), neg_mask.any(dim=1)
    l_cl = L.contrastive_loss(l_pos, l_neg, has_pos, has_neg, lc.beta)
    l_d = (L.discriminator_loss(s_grid, pos_mask & d_rows[:, None], neg_mask & d_rows[:, None], mult)
           if s_grid is not None else zero)
    loss = L.total_loss(l_pred, l_cl, l_d, lc.alpha1, lc.alpha2, alpha3)

    def mean_over(values, mask):  # in float64: the float32 sum over a count, as Python divided them before
        return (values * mask).sum().double() / mask.sum().clamp(min=1).double()

    # tensors, read once per log_every (StepOutput); a count is truncated as int() did
    metrics = {
        "loss": loss.detach(), "l_pred": l_pred.detach(), "l_cl": l_cl.detach(), "l_d": l_d.detach(),
        "l_pos": mean_over(l_pos.detach(), has_pos), "l_neg": mean_over(l_neg.detach(), has_neg),
        "s_pos": mean_over(s_pos.detach(), has_pos), "s_neg": mean_over(s_neg.detach(), has_neg),
        "alpha3": alpha3, "n_positives": (mult * pos_mask).sum().double().trunc() if m else 0,
        "n_negatives": (mult * neg_mask).sum().double().trunc() if m else 0, "n_candidates_scored": m,
        "examples_without_positive": (~has_pos).sum(),
        "neg_beyond_margin_share": L.beyond_margin_share(loss_grid, w_neg, has_neg, lc.delta, n_tok).detach(),
    }
    return StepOutput(loss, metrics)


def accumulate(model: nn.Module, micro_batches: Sequence[Batch], alpha3: float | None = None) -> dict:
    """Forward + backward of each micro-batch with its loss scaled by ``1 / len(micro_batches)``, so the gradient
    is that of the mean over micro-batches (one batch of their union when they are equal-sized); under DDP the
    gradients are all-reduced only on the last (``no_sync`` before). Returns the micro-batches' mean metrics, as
    float64 tensors (Python numbers stay numbers): nothing here waits for the device (``metric_values`` reads
    them)."""
    n = len(micro_batches)
    if not n:
        raise ValueError("accumulate: no micro-batch")
    totals: dict = {}
    for i, batch in enumerate(micro_batches):
        sync_off = model.no_sync() if (i < n - 1 and hasattr(model, "no_sync")) else nullcontext()
        with sync_off:
            out = model(batch, alpha3)
            (out.loss / n).backward()
        for key, value in out.tensors.items():
            value = value.double() if isinstance(value, torch.Tensor) else float(value)
            totals[key] = totals.get(key, 0.0) + value / n
    return totals
