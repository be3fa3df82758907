"""The student: any seq2seq checkpoint (hub name or local path), or a tiny T5 built from the config with a
Unigram tokenizer trained on the task's own text in about a second (no hub needed); save/load in Hugging Face
format; batched generation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from qcrd_ray.config import StudentConfig

log = logging.getLogger(__name__)

# T5's special tokens and ids: pad = 0 (also the decoder start), eos = 1, unk = 2.
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A T5-style Unigram tokenizer trained on ``texts``: SentencePiece-like ``▁`` word boundaries, every digit
    its own token (numbers are read digit by digit, which keeps arithmetic learnable), punctuation split off,
    ``</s>`` appended to every encoded sequence."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK, show_progress=False,
        initial_alphabet=list("0123456789+-*/().,:;?!'\"%$=<>"),
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    tok = _canonical_unigram(tok)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must get ids 0, 1, 2"
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


# Score precision kept by :func:`_canonical_unigram`: far above the trainer's float noise (~1e-15), far below the
# score gaps that matter for segmentation.
SCORE_DECIMALS = 4
# The trainer's step between the scores of the characters it had to add back (see _canonical_unigram).
_CHAR_PENALTY_STEP = 1e-4


def _canonical_unigram(tok: Tokenizer) -> Tokenizer:
    """The trained Unigram model with canonical scores and ids: specials first, then by score (rounded to
    :data:`SCORE_DECIMALS`), ties by piece text.

    The ``tokenizers`` Unigram trainer is not a pure function of its input: it walks Rust hash maps whose seed is
    random per process (PYTHONHASHSEED and RAYON_NUM_THREADS do not reach it). The pieces it keeps are the same;
    what varies is (1) the order, hence the ids, of pieces of equal score, (2) the last bits of scores summed in
    that order, and (3) the characters pruned away but required (the alphabet and every character of the text):
    it adds them back with scores ``min + k·1e-4``, ``k`` in hash order. (1) is fixed by the sort, (2) by the
    rounding, (3) by giving every single character in that bottom band the minimum score.
    """
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    n_special = len(SPECIAL_TOKENS)
    pieces = [(piece, round(score, SCORE_DECIMALS)) for piece, score in vocab[n_special:]]
    if pieces:
        low = min(score for _, score in pieces)
        band = low + _CHAR_PENALTY_STEP * sum(len(piece) == 1 for piece, _ in pieces) + 0.5 * 10**-SCORE_DECIMALS
        pieces = [(piece, low if len(piece) == 1 and score <= band else score) for piece, score in pieces]
    pieces.sort(key=lambda item: (-item[1], item[0]))
    data["model"]["vocab"] = [list(item) for item in vocab[:n_special]] + [list(item) for item in pieces]
    return Tokenizer.from_str(json.dumps(data))


def tiny_t5(cfg: StudentConfig, vocab_size: int) -> T5ForConditionalGeneration:
    """A small T5 with random weights, shaped by the ``tiny_*`` fields of the config."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=cfg.tiny_d_model,
        d_kv=max(1, cfg.tiny_d_model // cfg.tiny_heads),
        d_ff=cfg.tiny_d_ff,
        num_layers=cfg.tiny_layers,
        num_decoder_layers=cfg.tiny_layers,
        num_heads=cfg.tiny_heads,
        feed_forward_proj="gated-gelu",  # as T5 v1.1
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def load_student(cfg: StudentConfig, texts: Iterable[str] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: a tiny T5 with a tokenizer trained on ``texts`` when ``cfg.model == "tiny"``,
    else the checkpoint at a hub name or local path."""
    if cfg.model != "tiny":
        return load_pretrained(cfg.model, dtype=cfg.dtype)
    if texts is None:
        raise ValueError("student.model=tiny trains its tokenizer on the task's text: pass texts")
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("student.model=tiny: no text to train the tokenizer on")
    tokenizer = train_tokenizer(texts, cfg.tiny_vocab_size)
    model = tiny_t5(cfg, vocab_size=len(tokenizer)).to(_DTYPES[cfg.dtype])
    log.info("tiny T5: %d parameters, vocabulary %d", model.num_parameters(), len(tokenizer))
    return model, tokenizer


def load_pretrained(name_or_path: str | Path, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any seq2seq checkpoint by hub name or local path (a saved student, ``google/t5-v1_1-base``)."""
    name = str(name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=_DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Write the model (safetensors) and tokenizer in Hugging Face format; reload with :func:`load_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    batch_size: int = 32,
    max_input_len: int | None = None,
    cut_off: list[bool] | None = None,
) -> list[str]:
    """Decoded outputs for ``inputs``, in order: greedy at temperature 0, else sampling at ``temperature``
    (reproducible for a given ``seed``). ``cut_off``, when given, receives per output whether it stopped at
    ``max_new_tokens`` before its end-of-sequence token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sample = temperature > 0
    if sample and seed is not None:
        torch.manual_seed(seed)  # generate() samples with the global generator
    outputs: list[str] = []
    try:
        for start in range(0, len(inputs), batch_size):
            batch = tokenizer(
                list(inputs[start:start + batch_size]), return_tensors="pt", padding=True,
                truncation=max_input_len is not None, max_length=max_input_len,
            ).to(device)
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample else {"do_sample": False}
            ids = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens, num_beams=1, **kwargs,
            )
            outputs.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
            if cut_off is not None:
                eos = model.generation_config.eos_token_id
                eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=ids.device)
                cut_off.extend((~torch.isin(ids[:, 1:], eos_ids).any(dim=1)).tolist())
    finally:
        model.train(was_training)
    return [o.strip() for o in outputs]
