"""Teacher rows for training tests, built directly from the synthetic task (no teacher stage needed)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qcrd_ray.config import Config, from_dict
from qcrd_ray.data import synthetic
from qcrd_ray.data.arith import safe_eval
from qcrd_ray.data.schema import TEACHER_SCHEMA


def _sample(index: int, rationale: str, answer: str) -> dict:
    return {"index": index, "text": f"<Explanation>: {rationale} <Answer>: {answer}", "rationale": rationale,
            "answer": answer, "status": "ok", "error": ""}


def teacher_row(example: dict) -> dict:
    """Two correct rationales (the majority) and one that adds instead (the minority), as a teacher would."""
    a, op, b = example["label"].strip("() ").split()
    value = safe_eval(example["label"])
    good = [f"We compute {a} {op} {b} which is {value:g}.", f"The result of {a} {op} {b} is {value:g}."]
    wrong_label = f"( {a} + {b} )"
    bad = f"We add {a} and {b} to get {safe_eval(wrong_label):g}."
    samples = [_sample(0, good[0], example["label"]), _sample(1, bad, wrong_label), _sample(2, good[1], example["label"])]
    return {"id": example["id"], "task": "synthetic", "input": example["input"], "choices": [],
            "label": example["label"], "positives": good, "negatives": [bad], "majority_answer": example["label"],
            "agreement": 2 / 3, "teacher_correct": True, "samples": samples}


def write_teacher_dir(path: Path, n: int = 64, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rows = [teacher_row(e) for e in synthetic.make_split("train", train_size=n, eval_size=8, seed=seed)]
    pq.write_table(pa.Table.from_pylist(rows, schema=TEACHER_SCHEMA), path / "part-00000.parquet")
    (path / "summary.json").write_text("{}")  # the teacher stage writes one; the trainer must skip it
    return path


def small_config(**sections) -> Config:
    """A tiny, fast training setup: 2 CPU workers, tiny T5, short rounds, j = 1."""
    base = {
        "student": {"tiny_d_model": 32, "tiny_d_ff": 64, "tiny_layers": 1, "tiny_heads": 2, "tiny_vocab_size": 200,
                    "max_input_len": 96, "max_target_len": 32},
        "discriminator": {"hidden": 16, "pretrain_steps": 4, "refresh_steps": 2, "pretrain_batch_size": 8},
        "snapshots": {"j": 1, "max_new_tokens": 12, "sampler_num_cpus": 0.25},
        "train": {"num_workers": 2, "num_cpus_per_worker": 0.5, "batch_size": 8, "rounds": 3, "round_steps": 3,
                  "lr": 3e-3, "log_every": 1, "keep_checkpoints": 2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return from_dict(base)
