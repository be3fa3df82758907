"""The seq2seq family (T5 and other encoder-decoders): the prompt is the encoder's input, the target the decoder's.

The shared prompt pass is the encoder: ``explain: x`` is encoded once per example and every candidate rationale is
decoded over its (expanded) encoder states.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

from qcrd_ray.config import StudentConfig
from qcrd_ray.qcrd.losses import IGNORE_INDEX
from qcrd_ray.students.base import PromptStates, StudentFamily, encoder_for_d
from qcrd_ray.students.tokenizer import train_tokenizer


class Seq2SeqFamily(StudentFamily):
    name = "seq2seq"
    summary = "encoder-decoder (T5): the prompt is encoded once, every candidate is decoded over it"

    def matches(self, hf_config) -> bool:
        return bool(getattr(hf_config, "is_encoder_decoder", False))

    def build_tiny(self, cfg: StudentConfig, tokenizer) -> T5ForConditionalGeneration:
        config = T5Config(
            vocab_size=len(tokenizer),
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

    def tiny_tokenizer(self, texts, vocab_size):
        return train_tokenizer(texts, vocab_size, append_eos=True)

    def load_model(self, name_or_path: str, dtype: torch.dtype):
        return AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=dtype)

    def context_length(self, model) -> int | None:
        return getattr(model.config, "n_positions", None)  # T5: relative positions, no hard limit

    def padding_side(self) -> str:
        return "right"

    def encode_targets(self, tokenizer, texts, max_len: int) -> torch.Tensor:
        ids = tokenizer(text_target=list(texts), padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")["input_ids"]
        return ids.masked_fill(ids == tokenizer.pad_token_id, IGNORE_INDEX)

    # passing `labels=` would make the model compute its own (unused) batch loss: a second pass over the logits
    @staticmethod
    def _decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
        return model.prepare_decoder_input_ids_from_labels(labels=labels)

    def target_logits(self, model, ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=self._decoder_inputs(model, labels)).logits

    def encode_prompt(self, model, ids, mask) -> PromptStates:
        return PromptStates(model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    def candidate_logits(self, model, states: PromptStates, labels):
        return model(encoder_outputs=(states.hidden,), attention_mask=states.mask,
                     decoder_input_ids=self._decoder_inputs(model, labels)).logits

    def _new_tokens(self, output_ids, prompt_len):
        return output_ids[:, 1:]  # the decoder start token

    def disc_encoder(self, model, layers: int, share: bool):
        return encoder_for_d(model.get_encoder(), layers, share)  # T5's block 0 holds the position bias

    def question_encoder(self, model):
        return model.get_encoder()
