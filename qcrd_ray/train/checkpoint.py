"""What a round checkpoint holds and how it is written and read back (no Ray here).

A checkpoint directory (``RUN/train/checkpoints/round_NNNN``, written through ``ray.train.report``; a local path or
a URI) holds:

- ``model/``: the student in Hugging Face format (``student.save_student``), loadable on its own;
- ``discriminator.pt``: D's state dict (``qcrd`` with the quality judge on);
- ``trainer_state.pt``: optimizer, scheduler, the number of completed rounds, the optimizer step, α3, and every
  rank's RNG states, so a resumed run continues exactly where the checkpointed one stood;
- ``_COMPLETE.json`` (``storage.COMPLETE_MARKER``): every other file with its size. Ray Train uploads the folder
  file by file in no set order, so a checkpoint counts only when its listing is there and every file it lists has
  its size: a process killed mid-upload leaves a folder that :func:`latest` skips and nothing reads torn.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from qcrd_ray import storage

MODEL_DIR = "model"
DISC_FILE = "discriminator.pt"
STATE_FILE = "trainer_state.pt"
_ROUND_DIR = re.compile(r"^round_(\d{4,})$")


def round_dir_name(completed_rounds: int) -> str:
    return f"round_{completed_rounds:04d}"


@dataclass
class TrainerState:
    completed_rounds: int  # the round training resumes at
    global_step: int  # optimizer steps taken so far (also fixes the data order on resume)
    alpha3: float  # α3 for the round training resumes at (losses.alpha3_at_round after completed_rounds)
    optimizer: dict
    scheduler: dict
    rng: list  # per rank: see rng_state()


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's RNG states, and those of ``generators`` (the training step's own streams), in types
    ``torch.load(weights_only=True)`` reads back (numpy's key as a list)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
             "generators": {key: g.get_state() for key, g in (generators or {}).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a GPU rank's dropout draws from its device's
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: each rank drives one
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    for key, g in (generators or {}).items():
        if key in state.get("generators", {}):  # (a checkpoint written before the step's streams were saved)
            g.set_state(state["generators"][key])


def save(path: str | Path, student, tokenizer, disc, state: TrainerState) -> Path:
    """Write a checkpoint directory at local ``path`` (created), its completeness listing last."""
    from qcrd_ray.students import save_student

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_student(student, tokenizer, path / MODEL_DIR)
    if disc is not None:
        torch.save(disc.state_dict(), path / DISC_FILE)
    torch.save(vars(state), path / STATE_FILE)
    listing = {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    (path / storage.COMPLETE_MARKER).write_text(json.dumps({"files": listing}))
    return path


def load_state(location: storage.Location) -> TrainerState:
    """The trainer state of the checkpoint at ``location`` (a path or a URI). Read with ``weights_only=True``, as
    everything read back from storage is: write access to a bucket must not mean code execution."""
    data = storage.read_bytes(storage.join(location, STATE_FILE))
    return TrainerState(**torch.load(io.BytesIO(data), weights_only=True))


def is_complete(location: storage.Location) -> bool:
    """Whether every file the checkpoint's listing names is in place with its size."""
    try:
        listing = (storage.read_json(storage.join(location, storage.COMPLETE_MARKER)) or {})["files"]
    except (FileNotFoundError, ValueError, KeyError):  # no marker (or it went meanwhile), or one cut short
        return False
    fs, _ = storage.resolve(location)
    paths = [storage.resolve(storage.join(location, *rel.split("/")))[1] for rel in listing]
    infos = fs.get_file_info(paths)
    return all(i.type == pafs.FileType.File and i.size == listing[rel] for rel, i in zip(listing, infos))


def _round_dirs(checkpoints: storage.Location) -> list[tuple[int, str]]:
    """(completed rounds, location) of every ``round_NNNN`` folder under ``checkpoints``, newest first."""
    fs, path = storage.resolve(checkpoints)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(((int(m.group(1)), storage.join(checkpoints, m.group(0))) for i in infos
                   if i.type == pafs.FileType.Directory and (m := _ROUND_DIR.match(i.base_name))), reverse=True)


def latest(checkpoints: storage.Location) -> str | None:
    """The complete checkpoint with the most completed rounds under ``checkpoints`` (a path or a URI), or None."""
    return next((location for _, location in _round_dirs(checkpoints) if is_complete(location)), None)


def prune(checkpoints: storage.Location, keep: int) -> list[str]:
    """Delete every checkpoint folder older than the newest ``keep`` complete ones; returns what it deleted.
    Newer incomplete folders stay (a save under way, or one a resumed run writes again)."""
    found = _round_dirs(checkpoints)
    complete = [rounds for rounds, location in found if is_complete(location)]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1]
    deleted = [location for rounds, location in found if rounds < oldest_kept]
    for location in deleted:
        storage.delete_dir(location)
    return deleted
