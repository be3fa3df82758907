"""Any local Hugging Face causal or seq2seq model, sampled at the configured temperature.

Batched generation with per-row seeds: `PerRowSampler` draws each row's next token from that row's own
``torch.Generator`` (seeded by the sample's seed), so a sample does not depend on which rows share its batch
or on the global RNG. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
)

from qcrd_ray.config import Config
from qcrd_ray.teacher.backends.base import Completion, TeacherBackend


class PerRowSampler(LogitsProcessor):
    """Turns greedy decoding into temperature sampling with one generator per row: it samples each row's next
    token and leaves it as the only finite score, so the greedy argmax picks it."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks.unsqueeze(1), 0.0)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


class HFBackend(TeacherBackend):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        t = cfg.teacher
        self.device = torch.device("cuda" if t.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        model_config = AutoConfig.from_pretrained(t.model)
        self.seq2seq = bool(model_config.is_encoder_decoder)
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = auto.from_pretrained(t.model).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(t.model)
        if not self.seq2seq:
            self.tokenizer.padding_side = "left"  # causal models continue the prompt from its right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"  # a long few-shot prompt loses its oldest exemplars first
        positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
        limit = min(t.max_model_len, positions or t.max_model_len)
        self.max_input_len = limit if self.seq2seq else max(1, limit - t.max_tokens)

    def complete(self, rows: list[dict]) -> list[Completion]:
        return [Completion(text=text) for text in self.generate([r["prompt"] for r in rows], [r["seed"] for r in rows])]

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int]) -> list[str]:
        t = self.cfg.teacher
        enc = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_input_len
        ).to(self.device)
        processors = LogitsProcessorList()
        if t.temperature > 0:
            processors.append(PerRowSampler(seeds, t.temperature, self.device))
        out = self.model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=t.max_tokens,
            logits_processor=processors,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [cut_at_stop(text, tuple(t.stop)).strip() for text in texts]
