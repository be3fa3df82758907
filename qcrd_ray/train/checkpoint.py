"""What a round checkpoint holds and how it is written and read back (no Ray here).

A checkpoint directory (``RUN/train/checkpoints/round_NNNN``, written through ``ray.train.report``) holds:

- ``model/``: the student in Hugging Face format (``student.save_student``), loadable on its own;
- ``discriminator.pt``: D's state dict (``qcrd`` with the quality judge on);
- ``trainer_state.pt``: optimizer, scheduler, the number of completed rounds, the optimizer step, α3, and every
  rank's RNG states, so a resumed run continues exactly where the checkpointed one stood.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    alpha3: float
    optimizer: dict
    scheduler: dict
    rng: list  # per rank: see rng_state()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save(path: str | Path, student, tokenizer, disc, state: TrainerState) -> Path:
    """Write a checkpoint directory at ``path`` (created)."""
    from qcrd_ray.student import save_student

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_student(student, tokenizer, path / MODEL_DIR)
    if disc is not None:
        torch.save(disc.state_dict(), path / DISC_FILE)
    torch.save(vars(state), path / STATE_FILE)
    return path


def load_state(path: str | Path) -> TrainerState:
    return TrainerState(**torch.load(Path(path) / STATE_FILE, weights_only=False))


def latest(checkpoints_dir: str | Path) -> Path | None:
    """The checkpoint with the most completed rounds under ``checkpoints_dir``, or None."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _ROUND_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None
