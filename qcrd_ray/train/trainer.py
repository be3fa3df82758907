"""The Ray shell around the training loop: build the initial student once, start the snapshot store and the
negative sampler, run a ``TorchTrainer`` over Ray Data shards of the teacher rows, and export the final student.

Rerunning on the same run directory resumes: Ray Train finds the last checkpoint under
``RUN/train/checkpoints`` (``ray.train.get_checkpoint`` in the loop), and the store reloads the persisted
snapshots of the rounds before it from ``RUN/train/snapshots``. The loop checkpoints a round *before* it publishes
that round's snapshot, so the snapshot of the resumed round is always the checkpoint's own student, which rank 0
publishes again on start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch
import ray.train
from ray.data import ExecutionOptions
from ray.train.torch import TorchConfig, TorchTrainer

from qcrd_ray import console
from qcrd_ray import student as student_lib
from qcrd_ray.config import Config
from qcrd_ray.methods import method_spec
from qcrd_ray.qcrd.sampler import NegativePool
from qcrd_ray.qcrd.snapshots import snapshot_store
from qcrd_ray.qcrd.targets import tokenizer_texts
from qcrd_ray.train import checkpoint as ckpt
from qcrd_ray.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)

# Test hook: make every worker raise once this many rounds are checkpointed (a real mid-run failure).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
FAIL_AFTER_ROUND_ENV = "QCRD_FAIL_AFTER_ROUND"
# Ray Data read tasks ask for little CPU so they fit beside fractional train workers on a small machine.
_READ_NUM_CPUS = 0.25


def teacher_files(teacher_dir: str | Path) -> list[str]:
    files = sorted(str(p) for p in Path(teacher_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{teacher_dir}: no teacher shards (*.parquet); run `qcrd teach` first")
    return files


def run_training(cfg: Config, teacher_dir: str | Path, run_dir: str | Path) -> dict:
    """Train ``cfg.train.method`` on the teacher shards in ``teacher_dir``; the final student goes to
    ``run_dir/model`` (HF format + ``discriminator.pt`` when the method has D). Returns a summary of the run."""
    method = method_spec(cfg).name
    run_dir = Path(run_dir).resolve()
    train_dir = run_dir / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "config.yaml").write_text(cfg.to_yaml())
    (train_dir / "method").write_text(method + "\n")

    last = ckpt.latest(train_dir / "checkpoints")
    done = ckpt.load_state(last).completed_rounds if last else 0
    if done < cfg.train.rounds:
        _fit(cfg, teacher_files(teacher_dir), run_dir, resume_round=done)
        last = ckpt.latest(train_dir / "checkpoints")
    else:
        log.info("%s: all %d rounds already trained; exporting the last checkpoint", run_dir, done)
    state = ckpt.load_state(last)
    model_dir = export_model(last, run_dir / "model")
    return {"method": method, "rounds": state.completed_rounds, "steps": state.global_step,
            "alpha3": state.alpha3, "checkpoint": str(last), "model_dir": str(model_dir),
            "metrics": _last_metrics(train_dir / "metrics.jsonl")}


def _fit(cfg: Config, files: list[str], run_dir: Path, resume_round: int) -> None:
    train_dir = run_dir / "train"
    table = pq.read_table(files, columns=["id", "input", "label", "majority_answer", "positives", "negatives",
                                          "samples"])
    init_dir = train_dir / "init_model"
    if not (init_dir / "config.json").is_file():  # one vocabulary for every worker and the sampler
        torch.manual_seed(cfg.train.seed)  # a tiny student's random init is part of the run's reproducibility
        model, tokenizer = student_lib.load_student(cfg.student, tokenizer_texts(table.to_pylist()))
        student_lib.save_student(model, tokenizer, init_dir)

    # Read before the trainer and the sampler hold their CPUs: on a small machine the read's planning tasks
    # would otherwise wait forever for a whole free CPU.
    dataset = ray.data.read_parquet(files, num_cpus=_READ_NUM_CPUS).materialize()
    store = pool = None
    if method_spec(cfg).needs_student_negatives(cfg):
        name = "qcrd-snapshots-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
        store = snapshot_store(name, cfg.snapshots.j, cfg.snapshots.neg_source, str(train_dir / "snapshots"),
                               max_restarts=cfg.snapshots.actor_restarts)
        ray.get(store.restore.remote(resume_round - 1))  # rounds past the checkpoint (all, on a fresh start) go
        examples = list(zip(table.column("id").to_pylist(), table.column("input").to_pylist()))
        pool = NegativePool.start(str(init_dir), store, examples, cfg.snapshots, seed=cfg.train.seed)
        pool.request(resume_round)  # starts as soon as the snapshot it needs is published
    fail_after = os.environ.get(FAIL_AFTER_ROUND_ENV)
    # Ray Train's controller takes one worker report per health-check interval (default 2 s), so a report made
    # while the previous one waits blocks the step loop; 0.2 s keeps that wait negligible. The trainer hands
    # this variable on to its controller actor, locally and on a cluster.
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.2")
    tc = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "init_model_dir": str(init_dir),
                           "store": store, "negatives": pool,
                           "fail_after_round": int(fail_after) if fail_after else None},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.num_cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name="checkpoints", storage_path=str(train_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=0),  # a failed run is resumed by rerunning
        ),
        datasets={"train": dataset},
        # the same rows go to the same worker on every run, so a resumed run replays the interrupted one's order
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        # equal splits: each worker holds rows // workers (the driver follows rank 0's metrics for the display)
        with console.follow_training(f"train {cfg.train.method}", str(train_dir / "metrics.jsonl"), tc.rounds,
                                     tc.round_steps or table.num_rows // tc.num_workers // tc.batch_size):
            trainer.fit()
    finally:
        if pool is not None:
            pool.shutdown()
        if store is not None:
            ray.kill(store)


def export_model(checkpoint_dir: Path, out: Path) -> Path:
    """Copy a checkpoint's student (HF format) and D to ``out`` (replaced atomically)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir / ckpt.MODEL_DIR, tmp)
    if (checkpoint_dir / ckpt.DISC_FILE).is_file():
        shutil.copy2(checkpoint_dir / ckpt.DISC_FILE, tmp / ckpt.DISC_FILE)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _last_metrics(path: Path) -> dict:
    """The last per-step metrics line (round-end lines hold only timings)."""
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [m for m in lines if "loss" in m]
    return steps[-1] if steps else {}
