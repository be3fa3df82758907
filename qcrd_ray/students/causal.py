"""The causal family (decoder-only: Llama, Qwen, SmolLM, Gemma, GPT-2): the prompt and its completion are one sequence.

A prompt is ``predict: x`` or ``explain: x``, rendered through the tokenizer's chat template where it has one (as a
user message, with the assistant's turn opened). Prompts are padded on the left, so every prompt ends at the last
column; the completion follows it with positions counted from each prompt's real length, and it ends in the
end-of-sequence token. Only completion tokens carry a loss: prompt tokens never enter the labels (the ``-100``
masking of a concatenated sequence, done by construction).

The shared prompt pass (QCRD's fast path): the prompts run once through the base model with gradient, keeping
their keys and values; each candidate then runs only its own tokens against its prompt's cache. The prompt's last
token is fed again with the candidate (its logits predict the candidate's first token), so every logit comes from
the model's own forward and the result equals one full pass per candidate (tests/test_students.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from qcrd_ray.config import StudentConfig
from qcrd_ray.qcrd.losses import IGNORE_INDEX
from qcrd_ray.students.base import PromptStates, StudentError, StudentFamily, encoder_for_d, labels_to_ids
from qcrd_ray.students.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

_warned_no_template: set[str] = set()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded sequence: 0 at each row's first real token (pads get 0 too)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


class CausalEncoder(nn.Module):
    """A decoder-only base model used as an encoder (D's, or the question states D shares): its last hidden
    states, with positions counted from each row's first real token whatever side it is padded on."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                         use_cache=False)


class CausalFamily(StudentFamily):
    name = "causal"
    completion_in_context = True
    summary = "decoder-only (Llama, Qwen, SmolLM, GPT-2): prompt + completion, the prompt's keys/values shared"

    def matches(self, hf_config) -> bool:
        if getattr(hf_config, "is_encoder_decoder", False):
            return False
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def build_tiny(self, cfg: StudentConfig, tokenizer) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.tiny_d_model,
            intermediate_size=cfg.tiny_d_ff,
            num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=cfg.tiny_heads,
            num_key_value_heads=cfg.tiny_heads,
            max_position_embeddings=max(cfg.max_input_len + cfg.max_target_len, 512),
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        return LlamaForCausalLM(config)

    def tiny_tokenizer(self, texts, vocab_size):
        return train_tokenizer(texts, vocab_size, append_eos=False)  # completions get their </s> from us

    def load_model(self, name_or_path: str, dtype: torch.dtype):
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)

    def prepare_tokenizer(self, tokenizer, chat_template: str = "auto"):
        if tokenizer.pad_token is None:  # most decoder-only tokenizers have none: pad with eos (always masked)
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template == "none":
            tokenizer.chat_template = None  # saved so: eval and serve then use the task prompt too
        elif chat_template != "auto":
            path = Path(chat_template)
            if not path.is_file():
                raise StudentError(f"student.chat_template: {chat_template!r} is neither auto, none nor a Jinja "
                                   "file")
            tokenizer.chat_template = path.read_text()
        if not tokenizer.chat_template:
            key = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            if key not in _warned_no_template:
                _warned_no_template.add(key)
                log.info("%s has no chat template: the causal student reads the task prompt "
                         "(predict: x / explain: x) as it is", key)
        return tokenizer

    def context_length(self, model) -> int | None:
        config = model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def prompt(self, tokenizer, text: str) -> str:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return text

    def chat_prompt(self, tokenizer, messages) -> str:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                                 tokenize=False)
        return super().chat_prompt(tokenizer, messages)

    def add_special_tokens(self, tokenizer) -> bool:
        return not tokenizer.chat_template  # a chat template writes its own BOS where the model has one

    def padding_side(self) -> str:
        return "left"

    def encode_targets(self, tokenizer, texts, max_len: int) -> torch.Tensor:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise StudentError("the causal student's tokenizer has no eos_token: a completion could never end")
        rows = [(ids + [eos])[:max_len] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        width = max((len(r) for r in rows), default=1)
        return torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in rows], dtype=torch.long)

    @staticmethod
    def _check_prompt(ids: torch.Tensor) -> None:
        if ids.shape[1] < 1:
            raise StudentError("empty prompt: a causal student needs at least one prompt token")

    def target_logits(self, model, ids, mask, labels):
        self._check_prompt(ids)
        n = labels.shape[1]
        target_mask = (labels != IGNORE_INDEX).long()
        seq = torch.cat([ids, labels_to_ids(labels, model.config.pad_token_id or 0)[:, :-1]], dim=1)
        seq_mask = torch.cat([mask, target_mask[:, :-1]], dim=1)
        out = model(input_ids=seq, attention_mask=seq_mask, position_ids=positions(seq_mask), use_cache=False,
                    logits_to_keep=n)  # the last prompt token and the completion predict the completion
        return out.logits

    def encode_prompt(self, model, ids, mask) -> PromptStates:
        self._check_prompt(ids)
        out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        past = tuple((layer.keys, layer.values) for layer in out.cache.layers)
        return PromptStates(out.last_hidden_state, mask, past, last_ids=ids[:, -1:])

    def candidate_logits(self, model, states: PromptStates, labels):
        # the cache holds every prompt token but the last, which runs again with the candidate (its logits
        # predict the candidate's first token); keys/values are sliced, never copied per candidate by hand
        cache = DynamicCache(ddp_cache_data=[(k[:, :, :-1], v[:, :, :-1]) for k, v in states.past])
        target_mask = (labels != IGNORE_INDEX).long()
        seq = torch.cat([states.last_ids, labels_to_ids(labels, model.config.pad_token_id or 0)[:, :-1]], dim=1)
        full_mask = torch.cat([states.mask, target_mask[:, :-1]], dim=1)
        start = states.mask.long().sum(dim=1, keepdim=True) - 1  # the last prompt token's position
        pos = start + torch.arange(seq.shape[1], device=seq.device)
        return model(input_ids=seq, attention_mask=full_mask, position_ids=pos, cache=cache, use_cache=True).logits

    def _new_tokens(self, output_ids, prompt_len):
        return output_ids[:, prompt_len:]

    def _generate_kwargs(self, model, tokenizer) -> dict:
        return {"pad_token_id": tokenizer.pad_token_id}

    def disc_encoder(self, model, layers: int, share: bool):
        return CausalEncoder(encoder_for_d(model.get_decoder(), layers, share))

    def question_encoder(self, model):
        return CausalEncoder(model.get_decoder())
