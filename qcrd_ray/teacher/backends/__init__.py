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


def backend_class(name: str) -> type:
    """The callable class for a map_batches backend. vLLM is not one: it is a Ray Data processor (see `vllm`)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown map_batches teacher backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
