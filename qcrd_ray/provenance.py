"""Where a run trained: the machine and install its floats depend on (docs/quality.md, "Same seed, same result").

A run is a function of its config and seed on one machine with one install. Across CPU types, instruction sets,
thread counts and package versions the float kernels differ, 640 steps amplify the last bit into another student,
and a trial is another draw. So training records what it ran on at each start (``RUN/<method>/train/
environment.jsonl``, one line per start: a run resumed on another node shows both), and a sweep names each trial's
machine and says when its trials ran on more than one.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform

from qcrd_ray import storage

log = logging.getLogger(__name__)

# what a trial's numbers can move with: the kernels (torch), the student's code and tokenizer (transformers,
# tokenizers, peft), the data path (ray, pyarrow, numpy), the negatives' sampler (vllm) and this package
PACKAGES = ("torch", "transformers", "tokenizers", "peft", "ray", "numpy", "pyarrow", "vllm", "qcrd-ray")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """This process's machine and install: host, CPU (and GPU), the instruction set torch's CPU kernels use, its
    thread count, and the versions of :data:`PACKAGES` (None: not installed)."""
    import torch

    return {"host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "packages": {name: _version(name) for name in PACKAGES}}


def fingerprint(env: dict) -> str:
    """One line naming what decides a run's floats: the device, the kernels' instruction set, the thread count,
    and the versions of torch, transformers and tokenizers. Equal lines: the same seed gives the same student."""
    packages = env.get("packages") or {}
    versions = ", ".join(f"{name} {packages.get(name)}" for name in ("torch", "transformers", "tokenizers"))
    device = env.get("gpu") or env.get("cpu") or "?"
    return f"{device} · {env.get('cpu_capability')} · {env.get('torch_threads')} threads · {versions}"


def machines(records: list[dict]) -> str | None:
    """The distinct fingerprints of a run's ``environment.jsonl`` in order, joined with " + " (a run that moved
    between unlike machines mid-training); None for a run that recorded none (trained before this existed)."""
    seen = list(dict.fromkeys(fingerprint(r) for r in records))
    return " + ".join(seen) or None


def record_start(location: storage.Location, **start) -> None:
    """Append this process's :func:`environment` and ``start`` (step, world size) to ``location``. A storage
    failure is logged, not raised: provenance must not cost training one of its ``train.max_failures``."""
    try:
        storage.write_jsonl(location, storage.read_jsonl(location) + [{**start, **environment()}])
    except OSError as e:
        log.warning("could not record the training environment in %s (%s)", location, e)
