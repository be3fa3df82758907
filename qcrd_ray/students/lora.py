"""LoRA adapters on either family, through ``peft`` (``student.lora``; off while ``r`` is 0).

With LoRA on only the adapter weights train; what a run moves around is then the adapter alone: the snapshots the
SnapshotStore holds (:func:`trainable_state`), the checkpoints' ``model/`` (``save_pretrained`` of a peft model
writes ``adapter_model.safetensors`` + ``adapter_config.json``). The base weights are the run's initial student
(``RUN/<method>/train/init_model``), which every worker and sampler already has. The final model is exported both
merged (``RUN/<method>/model``, the default that eval and serve load, and what any HF or vLLM loader reads) and as
the adapter (``RUN/<method>/adapter``, whose ``adapter_config.json`` names its base).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

from torch import nn

from qcrd_ray.config import LoraConfig
from qcrd_ray.students.base import StudentError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def linear_module_names(model: nn.Module) -> list[str]:
    """The names (last component) of the modules LoRA can adapt: linear layers (GPT-2's Conv1D too)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and name and ".lora_" not in name
                   and not name.endswith(".base_layer")})


def target_modules(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The modules to adapt: ``cfg.target_modules``, or peft's default for the model type; every one must exist
    (else an error naming the ones that do)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    available = linear_module_names(model)
    targets = list(cfg.target_modules) or list(DEFAULTS.get(model.config.model_type, ()))
    if not targets:
        raise StudentError(f"student.lora.target_modules: peft knows no default for model_type "
                           f"{model.config.model_type!r}; name some of its linear modules: {', '.join(available)}")
    missing = sorted(set(targets) - set(available))
    if missing:
        raise StudentError(f"student.lora.target_modules: {', '.join(missing)} not in the model; its linear modules "
                           f"are {', '.join(available)}")
    return targets


def peft_config(model: nn.Module, cfg: LoraConfig, family: str):
    """peft's ``LoraConfig`` for ``model`` with explicit target modules (what a saved adapter records)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target_modules(model, cfg), task_type=_TASK_TYPES[family])


def apply_lora(model: nn.Module, cfg: LoraConfig, family: str) -> nn.Module:
    """``model`` with LoRA adapters (freshly initialised from the global torch RNG: seed it first), or ``model``
    itself when ``cfg.r`` is 0."""
    if not cfg.r:
        return model
    from peft import get_peft_model

    with _quiet_peft():
        return get_peft_model(model, peft_config(model, cfg, family))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Load a saved adapter's weights (``save_pretrained`` of a peft model) into LoRA ``model``."""
    from safetensors.torch import load_file

    load_trainable_state(model, load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS)))


def trainable_state(model: nn.Module) -> dict:
    """What changes in training: the adapter's weights under LoRA, else every weight (a snapshot, a publish)."""
    if is_lora(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trainable_state(model: nn.Module, state: dict) -> None:
    """The inverse of :func:`trainable_state` on a model of the same shape (adapter included)."""
    if is_lora(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise StudentError(f"adapter weights that the model lacks: {unexpected[:3]}")
    else:
        model.load_state_dict(state)


def merged(model: nn.Module) -> nn.Module:
    """A plain model with the adapter folded into its weights (a copy; ``model`` keeps its adapter)."""
    if not is_lora(model):
        return model
    with _quiet_peft():
        return copy.deepcopy(model).merge_and_unload()


@contextlib.contextmanager
def _quiet_peft():
    """peft asks transformers a deprecated question (``is_gradient_checkpointing``): nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def set_base(adapter_dir: str | Path, base: str) -> None:
    """Point a saved adapter at its base model (a hub name, a path or a storage URI)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base
    path.write_text(json.dumps(data, indent=2))


def adapter_base(adapter_dir: str | Path) -> str:
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
