"""The quality discriminator D (docs/design.md, "The algorithm"): s(x, r) ∈ (0, 1), how good rationale r is for question x.

D = encoder → max pooling over the non-pad tokens → Linear → ReLU → Linear → sigmoid. Its encoder is by default
a separate copy of the student's (same architecture and initial weights); ``share_encoder`` makes it pool the
student's own instead, so D's updates also move the student. What "the student's encoder" is belongs to the
student's family (qcrd_ray/students/): a seq2seq student's encoder; for a causal student, its decoder stack (the
base model under the LM head) read as an encoder, causal attention kept: each state sees the tokens before it, and
the max pool then reads the whole pair (docs/design.md, "Decoder-only students"). Under LoRA, D's copy is of the
student's initial (merged) weights and trains in full; a shared encoder trains only the student's adapters.

D reads one text per (question, rationale) pair, :func:`pair_text`: ``"question: <x> rationale: <r>"``, truncated
to the student's ``max_input_len`` tokens from the end (the question comes first, so a very long question can cut
the rationale short; such a pair is still scored on what fits).

Cost options (docs/design.md): ``layers`` keeps the first L blocks of the encoder copy; ``share_question_states``
makes D encode ``rationale: <r>`` alone and max-pool it together with the student's own *detached* encoder states of
``explain: <x>`` (the question is encoded once per example, by the student, and D's gradient never reaches it).

It is pre-trained (≤ ``pretrain_steps``) on teacher positives vs teacher negatives with binary cross-entropy; the
rarer class is topped up with augmented copies (random word masking and random word replacement) so both classes
are equally frequent. At each round end :func:`refresh` trains it a few steps on positives vs the new negatives.
Under DDP every rank trains on its own rows and the gradients are averaged over the ranks (weighted by each rank's
pairs), like the student's, so no rank waits while another trains D alone.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qcrd_ray.config import Config, DiscriminatorConfig
from qcrd_ray.data import prompts
from qcrd_ray.qcrd import targets
from qcrd_ray.students import family_of, lora

log = logging.getLogger(__name__)


def pair_text(question: str, rationale: str) -> str:
    """The single text D reads for a (question, rationale) pair."""
    return f"question: {question} rationale: {rationale}"


def rationale_text(rationale: str) -> str:
    """What D's own encoder reads under ``share_question_states`` (the question comes from the student)."""
    return f"rationale: {rationale}"


def precision_context(precision: str, device_type: str):
    """Autocast for ``train.precision`` (bf16 matmuls; callers compute losses and reductions in fp32)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Discriminator(nn.Module):
    """``s = sigmoid(W2 · relu(W1 · maxpool(encoder(x ⊕ r)) + b1) + b2)``."""

    def __init__(self, encoder: nn.Module, d_model: int, hidden: int, question_encoder: nn.Module | None = None,
                 family=None):
        super().__init__()
        self.family = family  # the student's (qcrd_ray/students/): how the question states' prompts are encoded
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # the student's encoder under share_question_states, held in a tuple so it is not one of D's parameters
        self._question_encoder = (question_encoder,) if question_encoder is not None else None

    @property
    def shares_question_states(self) -> bool:
        return self._question_encoder is not None

    @classmethod
    def from_student(cls, student: nn.Module, cfg: DiscriminatorConfig) -> "Discriminator":
        """D on top of ``student``'s encoder (its family says which module that is): a deep copy (default), cut to
        its first ``cfg.layers`` blocks, or the same module (``share_encoder``)."""
        if cfg.layers and cfg.share_encoder:
            raise ValueError("discriminator.layers cuts D's own encoder copy; it cannot be combined with "
                             "discriminator.share_encoder (set one of them off)")
        family = family_of(student)
        if lora.is_lora(student) and not cfg.share_encoder:
            # D's own copy holds plain weights (the adapter folded in), not peft's layers with frozen bases
            encoder = family.disc_encoder(lora.merged(student), cfg.layers, share=True)  # merged: already a copy
            for p in encoder.parameters():
                p.requires_grad_(True)
        else:
            encoder = family.disc_encoder(student, cfg.layers, share=cfg.share_encoder)
        return cls(encoder, family.hidden_size(student), cfg.hidden,
                   question_encoder=family.question_encoder(student) if cfg.share_question_states else None,
                   family=family)

    def question_states(self, question_ids: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """The student's detached states of ``explain: x`` (share_question_states)."""
        with torch.no_grad():
            return self._question_encoder[0](input_ids=question_ids, attention_mask=question_mask).last_hidden_state

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               question_states: torch.Tensor | None = None, question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-sigmoid scores ``[N]`` (binary cross-entropy on logits is the numerically stable form). Under
        share_question_states, ``input_ids`` is the rationale alone and ``question_states`` ``[N, Lq, d]``
        (detached) are pooled with it."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask
        if self.shares_question_states:
            if question_states is None:
                raise ValueError("D with discriminator.share_question_states needs the question's student states")
            hidden = torch.cat([question_states.detach().to(hidden.dtype), hidden], dim=1)
            mask = torch.cat([question_mask, attention_mask], dim=1)
        pad = ~mask.bool().unsqueeze(-1)
        pooled = hidden.masked_fill(pad, torch.finfo(hidden.dtype).min).max(dim=1).values
        return self.head(pooled.to(self.head[0].weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                question_states: torch.Tensor | None = None, question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Quality scores ``s ∈ (0, 1)``, shape ``[N]``."""
        return torch.sigmoid(self.logits(input_ids, attention_mask, question_states, question_mask))

    def score_encoded(self, enc: Mapping, device, *, logits: bool = False) -> torch.Tensor:
        """Scores (or logits) of :func:`encode_pairs` output, computing the question's states where needed."""
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        states = qmask = None
        if self.shares_question_states:
            qmask = enc["question_mask"].to(device)
            states = self.question_states(enc["question_ids"].to(device), qmask)
        out = self.logits(ids, mask, states, qmask)
        return out if logits else torch.sigmoid(out)


def encode_pairs(tokenizer, questions: Sequence[str], rationales: Sequence[str], max_len: int,
                 share_question_states: bool = False, family=None) -> dict:
    """Tokenized, padded D inputs (``input_ids``, ``attention_mask``) for parallel lists of questions and rationales;
    under ``share_question_states`` the rationale alone, plus ``question_ids``/``question_mask`` of ``explain: x``
    encoded as the student's ``family`` encodes its prompts (what the student reads)."""
    pairs = list(zip(questions, rationales, strict=True))
    if not share_question_states:
        enc = tokenizer([pair_text(q, r) for q, r in pairs], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    enc = tokenizer([rationale_text(r) for _, r in pairs], padding=True, truncation=True, max_length=max_len,
                    return_tensors="pt")
    if family is None:
        raise ValueError("encode_pairs under share_question_states needs the student's family")
    q_ids, q_mask = family.encode_prompts(
        tokenizer, [family.prompt(tokenizer, prompts.student_input("explain", x)) for x, _ in pairs], max_len)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "question_ids": q_ids, "question_mask": q_mask}


# ------------------------------------------------------------------------------------------------ augmentation


def mask_words(text: str, prob: float, rng: random.Random, mask_token: str) -> str:
    """Replace each word by ``mask_token`` with probability ``prob`` (at least one word when ``prob > 0``)."""
    words = text.split()
    if not words or prob <= 0:
        return text
    hits = [i for i in range(len(words)) if rng.random() < prob] or [rng.randrange(len(words))]
    for i in hits:
        words[i] = mask_token
    return " ".join(words)


def replace_words(text: str, prob: float, rng: random.Random, vocabulary: Sequence[str]) -> str:
    """Replace each word by a random word of ``vocabulary`` with probability ``prob`` (at least one when ``prob > 0``)."""
    words = text.split()
    if not words or prob <= 0 or not vocabulary:
        return text
    hits = [i for i in range(len(words)) if rng.random() < prob] or [rng.randrange(len(words))]
    for i in hits:
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


def augment(text: str, cfg: DiscriminatorConfig, rng: random.Random, mask_token: str, vocabulary: Sequence[str]) -> str:
    """One augmented copy of a rationale: word masking, then word replacement."""
    return replace_words(mask_words(text, cfg.mask_prob, rng, mask_token), cfg.replace_prob, rng, vocabulary)


@dataclass(frozen=True)
class Pair:
    question: str
    rationale: str
    label: float  # 1 = good rationale (positive), 0 = bad (negative)
    augmented: bool = False


def balanced_pairs(
    positives: Sequence[tuple[str, str]],
    negatives: Sequence[tuple[str, str]],
    cfg: DiscriminatorConfig,
    rng: random.Random,
    mask_token: str,
) -> list[Pair]:
    """All (question, rationale) pairs of both classes, the smaller class topped up with augmented copies of its
    own members until both classes have the same size. Returns [] when a class is empty (nothing to contrast)."""
    if not positives or not negatives:
        return []
    vocabulary = sorted({w for _, r in [*positives, *negatives] for w in r.split()})
    pairs = [Pair(q, r, 1.0) for q, r in positives] + [Pair(q, r, 0.0) for q, r in negatives]
    small, label = (negatives, 0.0) if len(negatives) < len(positives) else (positives, 1.0)
    for _ in range(abs(len(positives) - len(negatives))):
        q, r = rng.choice(small)
        pairs.append(Pair(q, augment(r, cfg, rng, mask_token, vocabulary), label, augmented=True))
    rng.shuffle(pairs)
    return pairs


def _mask_token(tokenizer) -> str:
    # T5 tokenizers have no [MASK]; their first sentinel plays that role, else the unknown token
    return getattr(tokenizer, "mask_token", None) or next(
        iter(getattr(tokenizer, "additional_special_tokens", None) or []), None
    ) or tokenizer.unk_token or "_"


# ------------------------------------------------------------------------------------------------ training


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_grads(params: Sequence[torch.nn.Parameter], n_local: int, device) -> int:
    """Average the ranks' gradients weighted by their batch sizes (a rank with no pairs contributes 0); returns the
    pairs over all ranks. Every rank calls it once per step, so every rank takes the same optimizer steps."""
    total = torch.tensor([float(n_local)], device=device)
    dist.all_reduce(total)
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        grad = grad * n_local
        dist.all_reduce(grad)
        p.grad = grad / total.clamp(min=1.0)
    return int(total.item())


def train_on_pairs(
    disc: Discriminator,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_len: int,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    desc: str = "discriminator",
    progress: bool = True,
    precision: str = "fp32",
) -> dict:
    """``steps`` steps of binary cross-entropy on ``pairs`` (cycled in a seeded order); returns loss statistics.

    Under DDP (an initialised process group of more than one rank) every rank calls it with its own ``pairs``
    (possibly none) and the gradients are averaged over the ranks, weighted by their batch sizes."""
    device = next(disc.parameters()).device
    params = [p for p in disc.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr)
    distributed = _distributed()
    order = list(range(len(pairs)))
    rng = random.Random(seed)
    was_training = disc.training
    disc.train()
    losses: list[float] = []
    cursor = len(order)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        batch = []
        while len(batch) < min(batch_size, len(pairs)):
            if cursor == len(order):
                rng.shuffle(order)
                cursor = 0
            batch.append(pairs[order[cursor]])
            cursor += 1
        optimizer.zero_grad(set_to_none=True)
        if batch:
            enc = encode_pairs(tokenizer, [p.question for p in batch], [p.rationale for p in batch], max_len,
                               disc.shares_question_states, disc.family)
            labels = torch.tensor([p.label for p in batch], device=device)
            with precision_context(precision, device.type):
                logits = disc.score_encoded(enc, device, logits=True)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
            loss.backward()
            losses.append(loss.item())
        if distributed:
            _all_reduce_grads(params, len(batch), device)
        optimizer.step()
    disc.train(was_training)
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": steps if (losses or distributed) else 0,
        "loss_first": sum(head) / len(head) if losses else None,
        "loss_last": sum(tail) / len(tail) if losses else None,
    }


def _teacher_pairs(rows: Iterable[Mapping], student_negatives: bool) -> tuple[list, list]:
    """(question, text) pairs in exactly the form D scores during training (qcrd/targets.py)."""
    positives, negatives = [], []
    for row in rows:
        q = row["input"]
        pos, neg = targets.teacher_targets(row)
        positives += [(q, r) for r in pos]
        negatives += [(q, r) for r in neg]
        if student_negatives:
            negatives += [(q, r) for r in targets.student_negatives(row)]
    return positives, negatives


def _train(disc, tokenizer, rows, cfg: Config, steps, *, student_negatives, seed, optimizer, progress, desc) -> dict:
    positives, negatives = _teacher_pairs(rows, student_negatives)
    stats = {"positives": len(positives), "negatives": len(negatives), "augmented": 0, "steps": 0,
             "loss_first": None, "loss_last": None, "skipped": None}
    pairs = []
    if not positives or not negatives:
        stats["skipped"] = f"no {'positives' if not positives else 'negatives'} to contrast"
        log.warning("%s: %s on this rank", desc, stats["skipped"])
    else:
        pairs = balanced_pairs(positives, negatives, cfg.discriminator, random.Random(seed), _mask_token(tokenizer))
    if _distributed():  # every rank trains, on its own rows (none here: it still joins each gradient average)
        flag = torch.tensor([float(bool(pairs))], device=next(disc.parameters()).device)
        dist.all_reduce(flag)
        if not flag.item():
            return stats
    elif not pairs:
        return stats
    stats["augmented"] = sum(p.augmented for p in pairs)
    stats.update(train_on_pairs(
        disc, tokenizer, pairs, steps=steps, batch_size=cfg.discriminator.pretrain_batch_size,
        lr=cfg.discriminator.lr, max_len=cfg.student.max_input_len, optimizer=optimizer, seed=seed,
        desc=desc, progress=progress, precision=cfg.train.precision,
    ))
    return stats


def pretrain_discriminator(
    disc: Discriminator,
    tokenizer,
    rows: Iterable[Mapping],
    cfg: Config,
    steps: int | None = None,
    *,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
) -> dict:
    """Pre-train D on teacher positives (label 1) vs teacher negatives (label 0) of TEACHER_SCHEMA ``rows``, classes
    balanced by augmentation, for ``min(steps, cfg.discriminator.pretrain_steps)`` steps.

    Returns ``{positives, negatives, augmented, steps, loss_first, loss_last, skipped}``; ``skipped`` names why
    nothing was trained (a class is missing: e.g. every example's samples agreed) and is None otherwise.
    """
    limit = cfg.discriminator.pretrain_steps
    steps = limit if steps is None else min(steps, limit)
    return _train(disc, tokenizer, rows, cfg, steps, student_negatives=False, seed=seed, optimizer=optimizer,
                  progress=progress, desc="pretrain D")


def refresh(
    disc: Discriminator,
    tokenizer,
    rows: Iterable[Mapping],
    cfg: Config,
    steps: int | None = None,
    *,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = False,
) -> dict:
    """Round-end update of D: ``steps`` (default ``cfg.discriminator.refresh_steps``) steps on teacher positives vs
    teacher negatives ∪ the rows' new ``student_negatives``. Deterministic given ``rows`` and ``seed``; under DDP
    every rank calls it with its own rows and the gradients are averaged, so every rank ends with the same D. Same return value as
    :func:`pretrain_discriminator`."""
    steps = cfg.discriminator.refresh_steps if steps is None else steps
    return _train(disc, tokenizer, rows, cfg, steps, student_negatives=True, seed=seed, optimizer=optimizer,
                  progress=progress, desc="refresh D")
