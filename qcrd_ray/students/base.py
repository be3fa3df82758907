"""What a student family is: the one owner of everything that depends on how the student model is built.

A family (``seq2seq``: T5; ``causal``: Llama, Qwen, SmolLM, GPT-2 and the like) says how to build a tiny model from
the config and load a real one, how its tokenizer is prepared, how the ``predict:`` / ``explain:`` prompts and their
targets become tensors, how the loss of a target given its prompt is computed (one full pass, or a shared prompt
pass then many candidates: :meth:`StudentFamily.encode_prompt` + :meth:`StudentFamily.candidate_losses`), how the
student generates, and what D's encoder is. The training step, the discriminator, the sampler, evaluation and
serving call these and never ask which family they hold.

Batch layout, the same for both families: prompts ``[B, Lp]`` with their attention mask (padded on the side the
family needs: right for seq2seq, left for causal so every prompt ends at the last column), targets ``[N, Lt]``
right-padded with ``-100``, and each family turns them into its model's inputs.
"""

from __future__ import annotations

import copy
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qcrd_ray.config import StudentConfig
from qcrd_ray.qcrd.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a prompt that exhausts memory raises in generate (a GPU's allocator, or the host's)
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)


class StudentError(ValueError):
    """A student model, tokenizer or setting the project cannot use, with the reason."""


@dataclass
class PromptStates:
    """What one pass over a batch of prompts leaves for scoring their candidates: the last hidden states (which D
    may pool under ``discriminator.share_question_states``) and, for a causal student, the prompt's keys and values
    per layer (the shared prefix)."""

    hidden: torch.Tensor  # [B, Lp, d]
    mask: torch.Tensor  # [B, Lp]
    past: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # per layer: keys, values [B, h, Lp, d_h]
    last_ids: torch.Tensor | None = None  # causal: each prompt's last token [B, 1] (fed again with a candidate)

    def select(self, index: torch.Tensor) -> "PromptStates":
        """The states of the prompts ``index`` (one row per candidate; rows repeat)."""
        past = None if self.past is None else tuple(
            (k.index_select(0, index), v.index_select(0, index)) for k, v in self.past)
        last = None if self.last_ids is None else self.last_ids.index_select(0, index)
        return PromptStates(self.hidden.index_select(0, index), self.mask.index_select(0, index), past, last)


class StudentFamily(ABC):
    """One kind of student model (see the module docstring). Stateless: every method takes what it works on."""

    name: str
    summary: str
    # a decoder-only model's completion takes positions of the prompt's context: a prompt may use only what the
    # completion's token budget leaves of ``context_length``
    completion_in_context: bool = False

    # ---------------------------------------------------------------------------------------------- models

    @abstractmethod
    def matches(self, hf_config) -> bool:
        """Whether a Hugging Face model config belongs to this family (``student.family: auto``)."""

    @abstractmethod
    def build_tiny(self, cfg: StudentConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        """A small model with random weights shaped by the ``tiny_*`` keys, for ``tokenizer``'s vocabulary."""

    @abstractmethod
    def tiny_tokenizer(self, texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerBase:
        """The tiny model's tokenizer, trained on ``texts``."""

    @abstractmethod
    def load_model(self, name_or_path: str, dtype: torch.dtype) -> PreTrainedModel:
        """The model at a hub name or local path."""

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase, chat_template: str = "auto"):
        """The tokenizer as the family uses it (padding side, a pad token); ``chat_template`` is the config's
        ``student.chat_template``. Returns it (changed in place)."""
        return tokenizer

    def context_length(self, model: PreTrainedModel) -> int | None:
        """The most positions the model takes, where its config says (None: no limit known): the prompt's, or the
        prompt's and the completion's together where ``completion_in_context``."""
        return None

    def hidden_size(self, model: PreTrainedModel) -> int:
        config = model.config
        return getattr(config, "d_model", None) or config.hidden_size

    # ------------------------------------------------------------------------------------------------ text

    def prompt(self, tokenizer: PreTrainedTokenizerBase, text: str) -> str:
        """The text the student reads for one student input (``predict: x`` / ``explain: x``)."""
        return text

    def chat_prompt(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping]) -> str:
        """The text the student reads for a chat conversation: through the tokenizer's chat template where it has
        one, else the last user message as a student input (the task prompt)."""
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise StudentError("messages: a chat request needs at least one user message")
        return self.prompt(tokenizer, str(users[-1].get("content") or ""))

    def add_special_tokens(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether encoding a prompt adds the tokenizer's special tokens (a chat template writes its own)."""
        return True

    @abstractmethod
    def padding_side(self) -> str:
        """Where prompts are padded (see the module docstring)."""

    def encode_prompts(self, tokenizer, prompts: Sequence[str], max_len: int | None = None) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
        """``(ids, mask)`` of prompt texts (already through :meth:`prompt`), padded on :meth:`padding_side`,
        truncated to ``max_len`` tokens when given (callers that must not truncate check
        :meth:`prompt_lengths` first)."""
        # the side per call, never by setting the tokenizer's attribute: threads may share a tokenizer
        enc = tokenizer(list(prompts), padding=True, padding_side=self.padding_side(),
                        truncation=max_len is not None, max_length=max_len,
                        add_special_tokens=self.add_special_tokens(tokenizer), return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def prompt_lengths(self, tokenizer, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt as :meth:`encode_prompts` encodes it, without truncation."""
        enc = tokenizer(list(prompts), add_special_tokens=self.add_special_tokens(tokenizer))
        return [len(ids) for ids in enc["input_ids"]]

    @abstractmethod
    def encode_targets(self, tokenizer, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Target token ids ``[N, Lt]``, right-padded with ``-100``, ending in the end-of-sequence token."""

    # ---------------------------------------------------------------------------------------------- losses

    @abstractmethod
    def target_logits(self, model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, Lt, V]`` predicting ``labels`` ``[N, Lt]`` given prompt ``i`` for target ``i``, in one full
        pass each (the label task, DSS's one rationale, and the naive reference path)."""

    @abstractmethod
    def encode_prompt(self, model, ids: torch.Tensor, mask: torch.Tensor) -> PromptStates:
        """One pass over the prompts (with gradient): what :meth:`candidate_logits` shares across candidates."""

    @abstractmethod
    def candidate_logits(self, model, states: PromptStates, labels: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, Lt, V]`` predicting ``labels`` ``[M, Lt]`` given ``states`` (one row per candidate, see
        :meth:`PromptStates.select`); equal to :meth:`target_logits` over the same prompts."""

    # ------------------------------------------------------------------------------------------ generation

    @abstractmethod
    def _new_tokens(self, output_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """The generated tokens of ``model.generate``'s output (without the prompt or decoder start)."""

    def _generate_kwargs(self, model, tokenizer) -> dict:
        return {}

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, batch_size: int = 32, max_input_len: int | None = None,
                 cut_off: list[bool] | None = None, failed: list[int] | None = None) -> list[str]:
        """Decoded outputs for ``prompts`` (texts through :meth:`prompt`), in order: greedy at temperature 0,
        else sampling at ``temperature`` (reproducible for a given ``seed``). ``cut_off``, when given, receives
        per output whether it stopped at ``max_new_tokens`` before its end-of-sequence token.

        A batch that runs out of memory is bisected (``qcrd_ray.isolation``): a prompt that exhausts memory on its
        own gets "" and its position goes into ``failed`` (logged when ``failed`` is not given); the others get
        their outputs."""
        from qcrd_ray.isolation import isolate_failures

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sample = temperature > 0
        if sample and seed is not None:
            torch.manual_seed(seed)  # generate() samples with the global generator
        eos_ids = torch.tensor(_eos_ids(model), device=device)
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample else {"do_sample": False}

        def run(batch: list[str]) -> list[tuple[str, bool]]:
            ids, mask = self.encode_prompts(tokenizer, batch, max_input_len)
            ids, mask = ids.to(device), mask.to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=1,
                                 **self._generate_kwargs(model, tokenizer), **kwargs)
            new = self._new_tokens(out, ids.shape[1])
            return list(zip(tokenizer.batch_decode(new, skip_special_tokens=True),
                            (~torch.isin(new, eos_ids).any(dim=1)).tolist()))

        results: list = []
        try:
            for start in range(0, len(prompts), batch_size):
                results += isolate_failures(run, list(prompts[start:start + batch_size]), catch=OUT_OF_MEMORY)
        finally:
            model.train(was_training)
        lost = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        if lost:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what the failed batches held
            log.error("generation ran out of memory on %d of %d prompts alone (positions %s): they get no output",
                      len(lost), len(prompts), lost[:10])
            if failed is not None:
                failed.extend(lost)
        results = [("", False) if isinstance(r, BaseException) else r for r in results]
        if cut_off is not None:
            cut_off.extend(cut for _, cut in results)
        return [text.strip() for text, _ in results]

    def stream(self, model, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
               seed: int | None = None, max_input_len: int | None = None,
               stop: threading.Event | None = None, cut_off: list[bool] | None = None) -> Iterator[str]:
        """The output for one prompt as it is generated, piece by piece (``TextIteratorStreamer``): the pieces
        joined are :meth:`generate`'s output for the same settings, before its final strip. Setting ``stop`` ends
        the generation at its next token (a client gone, a stop sequence met). ``cut_off``, when given, receives
        at the end whether the output stopped before its end-of-sequence token (at ``max_new_tokens``, or at
        ``stop``), as :meth:`generate` reports it."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = stop or threading.Event()
        last_token: list[int] = []  # the last generated token, seen by the stopping criterion after each step

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                last_token[:] = [int(input_ids[0, -1])]
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        device = next(model.parameters()).device
        ids, mask = self.encode_prompts(tokenizer, [prompt], max_input_len)
        sample = temperature > 0
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample else {"do_sample": False}
        errors: list[BaseException] = []

        def run():
            try:
                with torch.no_grad():
                    if sample and seed is not None:
                        torch.manual_seed(seed)
                    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, num_beams=1, streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([_Stop()]),
                                   **self._generate_kwargs(model, tokenizer), **kwargs)
            except BaseException as e:  # handed to the consumer: the streamer is ended so it does not wait forever
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, name="qcrd-stream", daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if errors:
            raise errors[0]
        if cut_off is not None:
            cut_off.append(not last_token or last_token[0] not in _eos_ids(model))

    # ------------------------------------------------------------------------------------------ discriminator

    @abstractmethod
    def disc_encoder(self, model, layers: int, share: bool) -> nn.Module:
        """D's encoder (``forward(input_ids, attention_mask)`` → an output with ``last_hidden_state``): a copy of
        the student's (first ``layers``, 0 = all) blocks, or the student's own when ``share``."""

    @abstractmethod
    def question_encoder(self, model) -> nn.Module:
        """The student's own module whose states of a prompt D pools under ``share_question_states``: the same
        states :meth:`encode_prompt` leaves in ``PromptStates.hidden``."""


def _eos_ids(model) -> list[int]:
    """The model's end-of-sequence token ids (its generation config holds one id or a list)."""
    eos = model.generation_config.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def labels_to_ids(labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Target labels with ``-100`` replaced by the pad id (as model inputs), and their mask."""
    return labels.masked_fill(labels == IGNORE_INDEX, pad_id)


def blocks_of(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The attribute name and list of a transformer stack's blocks (T5: ``block``; Llama/Qwen: ``layers``;
    GPT-2: ``h``)."""
    for name in ("block", "layers", "h"):
        blocks = getattr(module, name, None)
        if isinstance(blocks, nn.ModuleList):
            return name, blocks
    raise StudentError(f"{type(module).__name__}: cannot find its list of transformer blocks (block, layers or h)")


def encoder_for_d(module: nn.Module, layers: int, share: bool) -> nn.Module:
    """D's encoder from a student's stack: the stack itself (``share``) or a deep copy that D trains in full (a copy
    of a LoRA student's frozen stack included), cut to its first ``layers`` blocks (0 = all)."""
    if not share:
        module = copy.deepcopy(module)
        for p in module.parameters():
            p.requires_grad_(True)
    return cut_blocks(module, layers) if layers else module


def cut_blocks(module: nn.Module, layers: int) -> nn.Module:
    """``module`` (a copy) keeping its first ``layers`` blocks; the config's layer count follows."""
    name, blocks = blocks_of(module)
    if layers > len(blocks):
        raise StudentError(f"discriminator.layers={layers} exceeds the student's {len(blocks)} layers; set it to at "
                           "most that (0 = all)")
    setattr(module, name, nn.ModuleList(list(blocks)[:layers]))
    module.config = copy.deepcopy(module.config)
    for key in ("num_layers", "num_hidden_layers", "n_layer"):
        if hasattr(module.config, key):
            setattr(module.config, key, layers)
    if getattr(module.config, "layer_types", None):  # Qwen2/3 and others list one attention type per layer
        module.config.layer_types = module.config.layer_types[:layers]
    return module
