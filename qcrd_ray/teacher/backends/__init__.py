"""Teacher backends behind one interface (see `base.TeacherBackend`), selected by ``cfg.teacher.backend``.

Each backend module is imported only when chosen, so torch, httpx or vLLM load only where they are used.
"""

from __future__ import annotations

import importlib

# backend name -> (module under qcrd_ray.teacher.backends, class name)
_BACKENDS = {
    "synthetic": ("synthetic", "SyntheticBackend"),
    "recorded": ("recorded", "RecordedBackend"),
    "hf": ("hf", "HFBackend"),
    "http": ("http", "HTTPBackend"),
}


# backend name -> the answer types (data.tasks.TaskSpec.answer_type) of the tasks it can teach; None = any task.
# The synthetic teacher derives its rationale from the gold equation, so it serves numeric tasks only
# (synthetic, svamp); model-backed and recorded teachers serve any task.
SERVES: dict[str, tuple[str, ...] | None] = {
    "synthetic": ("numeric",),
    "recorded": None,
    "hf": None,
    "http": None,
    "vllm": None,
}


def backends_for(answer_type: str) -> list[str]:
    """The backends that can teach a task with this answer type."""
    return [name for name, types in SERVES.items() if types is None or answer_type in types]


def check_serves(backend: str, task: str, answer_type: str = "auto") -> None:
    """ConfigError, naming the backends that can, when ``backend`` cannot teach ``task``."""
    from qcrd_ray.config import ConfigError
    from qcrd_ray.data.tasks import get_task

    spec = get_task(task, answer_type)
    if backend in SERVES and backend not in backends_for(spec.answer_type):
        raise ConfigError(
            f"teacher.backend: {backend} cannot teach task {task!r} ({spec.answer_type} answers; it serves "
            f"{', '.join(SERVES[backend] or ())} tasks); set teacher.backend to one of "
            f"{', '.join(backends_for(spec.answer_type))}")


def backend_class(name: str) -> type:
    """The callable class for a map_batches backend. vLLM is not one: it is a Ray Data processor (see `vllm`)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown map_batches teacher backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
