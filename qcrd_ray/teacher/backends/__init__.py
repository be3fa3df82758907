"""Teacher backends: one registry entry each (`BACKENDS`), the only place that says what a backend is.

An entry owns everything the rest of the code asks about a backend: the answer types it serves, what it needs (a
model, a fixed number of samples per question, the examples' recorded rationales, a few-shot prompt), the parser of
its output, and ``build``, which adds its ``text``/``error`` columns to the Ray Data dataset of sample rows. Config
validation, the teacher pipeline and ``qcrd run``'s checks read the entry; nothing compares backend names. As in
``ray.data.llm``'s processor registry, the actor-pool backends and vLLM's processor are plain entries alike, and a
new backend is one `register` call (its implementation module, and its test).

This module stays light: config.py reads it for its choices and validation. A backend's implementation (torch,
httpx, vLLM) is imported only inside its ``build``, on the driver that builds the dataset and the workers that run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qcrd_ray.data import prompts
from qcrd_ray.errors import ConfigError


@dataclass(frozen=True)
class Backend:
    name: str
    help: str  # one line: what writes the rationales (the config's teacher.backend help lists these)
    # build(ds, cfg, then) -> ds: the sample rows (teacher.samples.expand_samples) with ``text`` and ``error``, with
    # ``then`` (the parse) applied to each such batch, in the backend's own stage where it can be
    build: Callable
    serves: tuple[str, ...] | None = None  # answer types (data.tasks) of the tasks it can teach; None = any task
    needs_model: bool = False  # teacher.model must name one
    fixed_k: int | None = None  # the samples per question it draws, where it cannot draw any number (recorded: 1)
    needs_rationales: bool = False  # the examples' recorded rationales travel to it (others never get them)
    needs_prompt: bool = True  # the sample rows carry the few-shot ``prompt`` (rule-based and replay backends: no)
    parse: Callable = prompts.parse_teacher_output  # (task, text, choices) -> ParsedRationale

    def serves_type(self, answer_type: str) -> bool:
        return self.serves is None or answer_type in self.serves

    def problem(self, k: int, model: str | None) -> tuple[str, str] | None:
        """(teacher key, why) when this backend cannot draw ``k`` samples per question with ``model``; else None."""
        if self.fixed_k is not None and k != self.fixed_k:
            return "k", f"the {self.name} backend draws exactly {self.fixed_k} sample(s) per question, not {k}"
        if self.needs_model and not model:
            return "model", f"the {self.name} backend needs a model name or path"
        return None


@dataclass(frozen=True)
class ActorPool:
    """The ``build`` of a backend that is a `base.TeacherBackend` class (``cls`` in ``module`` under this package):
    a map_batches actor pool, each actor holding one instance (its model or HTTP client loaded once)."""

    module: str
    cls: str

    def __call__(self, ds, cfg, then):
        from qcrd_ray.teacher.backends.base import actor_pool_stage

        return actor_pool_stage(ds, cfg, f"{__name__}.{self.module}", self.cls, then)

    def worker(self, cfg, then):
        """What one actor of the pool runs (the backend, then ``then``), in this process (benchmarks)."""
        from qcrd_ray.teacher.backends.base import TeacherWorker

        return TeacherWorker(cfg, f"{__name__}.{self.module}", self.cls, then)


def _vllm(ds, cfg, then):
    from qcrd_ray.teacher.backends import vllm

    return vllm.build(ds, cfg, then)


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a registry entry; returns it."""
    BACKENDS[backend.name] = backend
    return backend


# The synthetic teacher derives its rationale from the gold equation, so it serves numeric tasks only (synthetic,
# svamp); model-backed and recorded teachers serve any task.
register(Backend("synthetic", "rule-based, no model", ActorPool("synthetic", "SyntheticBackend"),
                 serves=("numeric",), needs_prompt=False))
register(Backend("recorded", "the dataset's llm/ rationales, one per question",
                 ActorPool("recorded", "RecordedBackend"), fixed_k=1, needs_rationales=True, needs_prompt=False,
                 parse=prompts.parse_recorded_cot))
register(Backend("hf", "a local Hugging Face model", ActorPool("hf", "HFBackend"), needs_model=True))
register(Backend("http", "an OpenAI-compatible API", ActorPool("http", "HTTPBackend")))
register(Backend("vllm", "Ray Data LLM on GPUs", _vllm, needs_model=True))


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown teacher backend {name!r}; choose one of {', '.join(BACKENDS)}") from None


def backends_for(answer_type: str) -> list[str]:
    """The backends that can teach a task with this answer type."""
    return [name for name, b in BACKENDS.items() if b.serves_type(answer_type)]


def check_serves(backend: str, task: str, answer_type: str = "auto", where: str = "teacher.backend") -> None:
    """ConfigError, naming the backends that can, when ``backend`` cannot teach ``task``."""
    from qcrd_ray.data.tasks import get_task

    spec, entry = get_task(task, answer_type), get_backend(backend)
    if not entry.serves_type(spec.answer_type):
        raise ConfigError(
            f"{where}: {backend} cannot teach task {task!r} ({spec.answer_type} answers; it serves "
            f"{', '.join(entry.serves or ())} tasks); set {where} to one of "
            f"{', '.join(backends_for(spec.answer_type))}")

