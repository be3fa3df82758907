"""Student families: the registry and the functions every stage uses to build, load, save and run a student.

``student.family`` picks a family by name (``auto`` reads the model's config); a new family is one
:class:`~qcrd_ray.students.base.StudentFamily` subclass and one :func:`register_family` call. Nothing outside this
package asks whether a student is seq2seq or causal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch

from qcrd_ray.config import StudentConfig
from qcrd_ray.students import lora
from qcrd_ray.students.base import DTYPES, PromptStates, StudentError, StudentFamily
from qcrd_ray.students.causal import CausalFamily
from qcrd_ray.students.seq2seq import Seq2SeqFamily

log = logging.getLogger(__name__)

__all__ = ["FAMILIES", "PromptStates", "StudentError", "StudentFamily", "family_named", "family_of",
           "resolve_family", "build_tiny", "load_student", "load_pretrained", "load_for_training", "save_student", "generate", "register_family"]

FAMILIES: dict[str, StudentFamily] = {}


def register_family(family: StudentFamily) -> StudentFamily:
    FAMILIES[family.name] = family
    return family


register_family(Seq2SeqFamily())
register_family(CausalFamily())


def family_named(name: str) -> StudentFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise StudentError(f"student.family {name!r}: choose auto or one of {', '.join(FAMILIES)}") from None


def family_of_config(hf_config, what: str = "the model") -> StudentFamily:
    """The family a Hugging Face model config belongs to; an error naming the model type when none fits."""
    for family in FAMILIES.values():
        if family.matches(hf_config):
            return family
    raise StudentError(f"{what} (model_type {getattr(hf_config, 'model_type', '?')!r}) is neither a seq2seq "
                       "(encoder-decoder) nor a causal (decoder-only) language model; qcrd students are one of these")


def family_of(model) -> StudentFamily:
    """The family of a loaded model (a LoRA-wrapped one too)."""
    return family_of_config(model.config)


def resolve_family(cfg: StudentConfig) -> StudentFamily:
    """The family of ``student``: ``student.family`` when named, else the model's config (tiny: seq2seq)."""
    if cfg.family != "auto":
        return family_named(cfg.family)
    if cfg.model == "tiny":
        return FAMILIES["seq2seq"]
    from transformers import AutoConfig

    return family_of_config(AutoConfig.from_pretrained(cfg.model), cfg.model)


def build_tiny(cfg: StudentConfig, tokenizer):
    """A tiny model of ``cfg``'s family with random weights for ``tokenizer`` (the global torch RNG: seed it)."""
    return resolve_family(cfg).build_tiny(cfg, tokenizer)


def load_student(cfg: StudentConfig, texts: Iterable[str] | None = None):
    """The initial student ``(model, tokenizer)``, without LoRA (adapters are added where training starts): a
    tiny model of the family with a tokenizer trained on ``texts`` when ``student.model`` is ``tiny``, else the
    checkpoint at a hub name or local path."""
    family = resolve_family(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.model == "tiny":
        if texts is None:
            raise ValueError("student.model=tiny trains its tokenizer on the task's text: pass texts")
        texts = list(texts)
        if not any(t.strip() for t in texts):
            raise ValueError("student.model=tiny: no text to train the tokenizer on")
        tokenizer = family.prepare_tokenizer(family.tiny_tokenizer(texts, cfg.tiny_vocab_size), cfg.chat_template)
        model = family.build_tiny(cfg, tokenizer).to(dtype)
        log.info("tiny %s student: %d parameters, vocabulary %d", family.name, model.num_parameters(), len(tokenizer))
        return model, tokenizer
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(cfg.model)
    if not family.matches(hf_config):
        raise StudentError(f"student.model {cfg.model!r} is not a {family.name} model "
                           f"(model_type {hf_config.model_type!r}); set student.family to auto")
    model = family.load_model(cfg.model, dtype)
    tokenizer = family.prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.model), cfg.chat_template)
    return model, tokenizer


def load_pretrained(name_or_path: str | Path, dtype: str = "float32"):
    """A saved student ``(model, tokenizer)``: a Hugging Face model folder (or hub name) of either family, or a
    LoRA adapter folder (``adapter_config.json``), loaded on its base (a hub name, a path or a storage URI)."""
    from transformers import AutoConfig, AutoTokenizer

    name = str(name_or_path)
    if lora.is_adapter_dir(name):
        from peft import PeftModel

        from qcrd_ray import storage

        base = lora.adapter_base(name)
        base_local = str(storage.download_dir(base)) if storage.is_uri(base) else base
        model, _ = load_pretrained(base_local, dtype)
        model = PeftModel.from_pretrained(model, name)
        tokenizer = AutoTokenizer.from_pretrained(name)
        return model, family_of(model).prepare_tokenizer(tokenizer)
    family = family_of_config(AutoConfig.from_pretrained(name), name)
    model = family.load_model(name, DTYPES[dtype])
    return model, family.prepare_tokenizer(AutoTokenizer.from_pretrained(name))


def load_for_training(cfg: StudentConfig, init_dir: str | Path | None,
                      checkpoint_model_dir: str | Path | None = None):
    """The student a train worker or a negative sampler holds: the initial student at ``init_dir``, with LoRA
    adapters when ``student.lora.r`` > 0 (initialised from the global torch RNG: seed it first), and the weights of
    a checkpoint's ``model/`` on top when resuming (under LoRA that folder holds only the adapter)."""
    if checkpoint_model_dir is not None and not cfg.lora.r:
        return load_pretrained(checkpoint_model_dir, cfg.dtype)
    if init_dir is None:
        raise ValueError("load_for_training: the initial student's folder is needed (LoRA, or no checkpoint)")
    model, tokenizer = load_pretrained(init_dir, cfg.dtype)
    model = lora.apply_lora(model, cfg.lora, family_of(model).name)
    if checkpoint_model_dir is not None:
        lora.load_adapter(model, checkpoint_model_dir)
    return model, tokenizer


def family_of_dir(model_dir: str | Path):
    """``(family, tokenizer)`` of a saved student folder, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    if lora.is_adapter_dir(model_dir):
        from qcrd_ray import storage

        base = lora.adapter_base(model_dir)
        family = family_of_config(AutoConfig.from_pretrained(
            str(storage.download_dir(base)) if storage.is_uri(base) else base), str(model_dir))
    else:
        family = family_of_config(AutoConfig.from_pretrained(str(model_dir)), str(model_dir))
    return family, family.prepare_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))


def long_prompts(family: StudentFamily, tokenizer, rows: Sequence[dict], max_len: int,
                 modes: Sequence[str] = ("predict", "explain")) -> list[dict]:
    """The rows (``id``, ``input``) whose prompt in one of ``modes``, as the student reads it, is longer than
    ``max_len`` tokens, as reject records ``{id, reason}`` (pure)."""
    from qcrd_ray.data import prompts

    rejects: dict[str, dict] = {}  # by id: one record per row, its first too-long mode
    for mode in modes:
        texts = [family.prompt(tokenizer, prompts.student_input(mode, r["input"])) for r in rows]
        for row, n in zip(rows, family.prompt_lengths(tokenizer, texts)):
            if n > max_len and row["id"] not in rejects:
                rejects[row["id"]] = {"id": row["id"], "reason": f"{mode} prompt of {n} tokens is longer than "
                                                                 f"student.max_input_len={max_len}"}
    return list(rejects.values())


def save_student(model, tokenizer, path: str | Path) -> Path:
    """Write the model (safetensors; a LoRA student: its adapter only) and tokenizer in Hugging Face format;
    reload with :func:`load_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def generate(model, tokenizer, inputs: Sequence[str], **kwargs) -> list[str]:
    """Outputs for student inputs (``predict: x`` / ``explain: x``, or raw prompts), rendered by the model's
    family (its chat template where it has one); keyword arguments as :meth:`StudentFamily.generate`."""
    family = family_of(model)
    return family.generate(model, tokenizer, [family.prompt(tokenizer, t) for t in inputs], **kwargs)


def num_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
