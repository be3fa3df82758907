"""Engines that sample student negatives from a lagged snapshot (``snapshots.engine``), behind one interface.

A negative sampler actor (qcrd_ray/samplers.py) holds one engine: it loads each snapshot the SnapshotStore serves
(:meth:`NegativeEngine.load`: the student's trainable weights, the adapter alone under LoRA) and samples one
``explain:`` output per example (:meth:`NegativeEngine.sample`), returning the texts and whether each was cut off
at ``max_new_tokens``.

- ``hf``: Hugging Face ``generate`` on the actor's own copy of the student (either family, any machine).
- ``vllm``: vLLM on a GPU node, causal students only (vLLM dropped encoder-decoder models). The base model is
  loaded once; a LoRA snapshot is written as an adapter folder and sampled with a ``LoRARequest`` per snapshot
  round, so the student's past selves are served side by side on one base; a full-weights snapshot is written as a
  model folder and the engine is rebuilt on it (slow: one engine start per round). Each prompt gets its own seed
  (``seed + i``), the same seeding inputs as the hf engine, which seeds one generator per round; the two engines'
  samples differ (different random streams), their records do not. **This engine has not been run**: vLLM cannot
  be installed on the machines this project is developed on; its contract is tested with a fake ``vllm`` module
  (tests/test_engines.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

from qcrd_ray.config import SnapshotConfig, StudentConfig
from qcrd_ray.students import lora
from qcrd_ray.students.base import StudentError

log = logging.getLogger(__name__)


class NegativeEngine(ABC):
    """Samples student negatives from the snapshot it last loaded."""

    @abstractmethod
    def load(self, snap_round: int, state: dict) -> None:
        """Take snapshot ``snap_round``'s trainable weights (``lora.trainable_state`` of the training student)."""

    @abstractmethod
    def sample(self, inputs: Sequence[str], *, temperature: float, seed: int, max_new_tokens: int,
               batch_size: int) -> tuple[list[str], list[bool]]:
        """One output per student input (``explain: x``), None for an input that exhausted memory on its own (the
        sampler leaves its example without a student negative), and per output whether it was cut off."""


class HFEngine(NegativeEngine):
    def __init__(self, model_dir: str | Path, student: StudentConfig, snapshots: SnapshotConfig):
        from qcrd_ray.students import load_for_training

        self.model, self.tokenizer = load_for_training(student, model_dir)
        self.model.eval()

    def load(self, snap_round: int, state: dict) -> None:
        lora.load_trainable_state(self.model, state)

    def sample(self, inputs, *, temperature, seed, max_new_tokens, batch_size):
        from qcrd_ray.students import generate

        cut_off: list[bool] = []
        failed: list[int] = []
        texts = generate(self.model, self.tokenizer, list(inputs), max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, batch_size=batch_size, cut_off=cut_off, failed=failed)
        lost = set(failed)
        return [None if i in lost else t for i, t in enumerate(texts)], cut_off


class VLLMEngine(NegativeEngine):
    """See the module docstring (not run here)."""

    def __init__(self, model_dir: str | Path, student: StudentConfig, snapshots: SnapshotConfig):
        from transformers import AutoConfig, AutoTokenizer

        from qcrd_ray.students import family_of_config

        self.model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.family = family_of_config(config, str(model_dir))
        if self.family.name != "causal":
            raise StudentError("snapshots.engine=vllm samples causal (decoder-only) students only: vLLM dropped "
                               "encoder-decoder models; use snapshots.engine=hf")
        self.tokenizer = self.family.prepare_tokenizer(AutoTokenizer.from_pretrained(self.model_dir))
        self.student = student
        self.options = {"max_model_len": student.max_input_len + snapshots.max_new_tokens,
                        "gpu_memory_utilization": snapshots.vllm_gpu_memory_utilization,
                        "dtype": student.dtype, "seed": 0}
        self.work = Path(tempfile.mkdtemp(prefix="qcrd-vllm-"))
        self.peft_config = None
        if student.lora.r:
            import torch
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):  # only the module names are needed, not the weights
                skeleton = AutoModelForCausalLM.from_config(config)
            self.peft_config = lora.peft_config(skeleton, student.lora, "causal")
            self.options.update(enable_lora=True, max_lora_rank=student.lora.r, max_loras=2)
        self.llm = self._engine(self.model_dir)
        self.request = None  # the LoRARequest of the loaded snapshot

    def _engine(self, model_dir: Path):
        from vllm import LLM

        return LLM(model=str(model_dir), tokenizer=str(model_dir), **self.options)

    def load(self, snap_round: int, state: dict) -> None:
        from safetensors.torch import save_file

        folder = self.work / f"round_{snap_round:04d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        if self.peft_config is not None:
            from vllm.lora.request import LoRARequest

            self.peft_config.save_pretrained(folder)
            save_file(tensors, str(folder / lora.ADAPTER_WEIGHTS))  # the keys peft's save_pretrained writes
            # a distinct id per round: vLLM caches adapters by id
            self.request = LoRARequest(f"snapshot-{snap_round}", snap_round + 1, str(folder))
        else:
            for item in self.model_dir.iterdir():  # config and tokenizer; the weights are the snapshot's
                if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".index.json")):
                    shutil.copy2(item, folder / item.name)
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            del self.llm
            self.llm = self._engine(folder)
        for old in self.work.iterdir():  # the engine holds at most the adapter it serves now
            if old != folder and self.peft_config is not None:
                shutil.rmtree(old, ignore_errors=True)

    def sample(self, inputs, *, temperature, seed, max_new_tokens, batch_size):
        from vllm import SamplingParams

        prompts = [self.family.prompt(self.tokenizer, text) for text in inputs]
        params = [SamplingParams(temperature=temperature, seed=seed + i, max_tokens=max_new_tokens)
                  for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, lora_request=self.request, use_tqdm=False)
        texts = [o.outputs[0].text.strip() for o in outputs]
        cut_off = [o.outputs[0].finish_reason == "length" for o in outputs]
        return texts, cut_off


ENGINES: dict[str, type[NegativeEngine]] = {"hf": HFEngine, "vllm": VLLMEngine}


def build_engine(name: str, model_dir: str | Path, student: StudentConfig, snapshots: SnapshotConfig) -> NegativeEngine:
    try:
        engine = ENGINES[name]
    except KeyError:
        raise StudentError(f"snapshots.engine {name!r}: choose one of {', '.join(ENGINES)}") from None
    return engine(model_dir, student, snapshots)
