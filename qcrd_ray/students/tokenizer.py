"""The tiny students' tokenizer: a Unigram model trained on the task's own text in about a second (no hub)."""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# T5's special tokens and ids: pad = 0 (also the decoder start), eos = 1, unk = 2.
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, append_eos: bool = True) -> PreTrainedTokenizerFast:
    """A T5-style Unigram tokenizer trained on ``texts``: SentencePiece-like ``▁`` word boundaries, every digit
    its own token (numbers are read digit by digit, which keeps arithmetic learnable), punctuation split off,
    ``</s>`` appended to every encoded sequence when ``append_eos`` (a seq2seq student's inputs and targets; a
    causal student appends it to its completions itself)."""
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
    if append_eos:
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
