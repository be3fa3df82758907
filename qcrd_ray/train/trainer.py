"""The Ray shell around the training loop: build the initial student once, start the snapshot store and the
negative sampler, run a ``TorchTrainer`` over Ray Data shards of the teacher rows, and export the final student.

Every location comes from ``runs.MethodLayout`` and may be a local path or a URI (``s3://…``); the driver, the
workers and the actors reach it through ``qcrd_ray.storage`` only, so nothing on a worker reads a driver-local
path. Ray Train's ``RunConfig`` stores checkpoints at ``RUN/train/checkpoints`` (``storage.train_storage``).

Faults: a worker lost mid-run (``train.max_failures`` times) makes Ray Train restart the worker group from the
latest checkpoint in the same ``fit`` call; a run that stopped anyway is resumed by rerunning it (under the config
it was made with: another one is refused). Either way the loop starts from the newest complete checkpoint in
storage (``train.loop.resume_checkpoint``, not Ray Train's ``get_checkpoint``), and the store reloads the persisted
snapshots of the rounds before it. The loop checkpoints a round *before* it publishes that round's snapshot, so
the snapshot of the resumed round is always the checkpoint's own student, which rank 0 publishes again on start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

import ray
import ray.train
import torch
from ray.data import ExecutionOptions
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.callback import UserCallback

from qcrd_ray import console, storage
from qcrd_ray import students as student_lib
from qcrd_ray.config import Config
from qcrd_ray.methods import method_spec
from qcrd_ray.actors.sampler import NegativePool
from qcrd_ray.actors.snapshots import snapshot_store
from qcrd_ray.qcrd.targets import tokenizer_texts
from qcrd_ray.runs import MethodLayout, check_same_config
from qcrd_ray.students import lora
from qcrd_ray.train import checkpoint as ckpt
from qcrd_ray.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Ray Data read tasks ask for little CPU so they fit beside fractional train workers on a small machine.
_READ_NUM_CPUS = 0.25
_TEACHER_COLUMNS = ["id", "input", "label", "majority_answer", "positives", "negatives", "samples"]


class FailureNotices(UserCallback):
    """One console line per worker-group failure (on Ray Train's controller, whose output reaches the driver):
    which ranks were lost and why, and whether Ray Train restarts them from the latest checkpoint or the run stops.
    The loop says which round it resumed at (``train.loop``)."""

    def __init__(self, max_failures: int):
        self.max_failures, self.failures = max_failures, 0

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.failures += 1
        ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
        error = next(iter(worker_exceptions.values()))
        why = (str(error).strip().splitlines() or [""])[0][:200]
        if self.max_failures < 0 or self.failures <= self.max_failures:
            used = "" if self.max_failures < 0 else f" ({self.failures} of {self.max_failures} failures used)"
            then = f"restarting the workers from the latest checkpoint{used}"
        else:
            then = f"train.max_failures={self.max_failures} spent: the run stops (rerun it to resume)"
        console.notice(f"train worker rank {ranks} lost ({type(error).__name__}: {why}); {then}")


def teacher_files(teacher_dir: storage.Location) -> list[str]:
    files = storage.list_files(teacher_dir, "*.parquet")
    if not files:
        raise FileNotFoundError(f"{teacher_dir}: no teacher shards (*.parquet); run `qcrd teach` first")
    return files


def run_training(cfg: Config, teacher_dir: storage.Location, run_dir: storage.Location) -> dict:
    """Train ``cfg.train.method`` on the teacher shards in ``teacher_dir``; the final student goes to
    ``run_dir/model`` (HF format + ``discriminator.pt`` when the method has D, completeness marker last). Both may
    be local paths or URIs. Returns a summary of the run."""
    method = method_spec(cfg).name
    layout = MethodLayout.at(os.fspath(run_dir))
    check_same_config(layout.train_config, cfg, layout.root)  # a resume under another config is refused

    last = ckpt.latest(layout.checkpoints)
    done = ckpt.load_state(last).completed_rounds if last else 0
    if done < cfg.train.rounds:
        _fit(cfg, teacher_files(teacher_dir), layout, resume_round=done)
        last = ckpt.latest(layout.checkpoints)
        # Ray Train's num_to_keep deletes only the checkpoints it recorded; one uploaded by a run killed before
        # Ray Train recorded it (the run resumed from it all the same, train.loop.resume_checkpoint) stays
        ckpt.prune(layout.checkpoints, cfg.train.keep_checkpoints)
    else:
        log.info("%s: all %d rounds already trained; exporting the last checkpoint", layout.root, done)
    state = ckpt.load_state(last)
    export_model(last, layout, cfg)
    return {"method": method, "rounds": state.completed_rounds, "steps": state.global_step,
            "alpha3": state.alpha3, "checkpoint": last, "model_dir": layout.model,
            "adapter_dir": layout.adapter if cfg.student.lora.r else None,
            "metrics": _last_metrics(layout.metrics)}


def _init_student(cfg: Config, table, layout: MethodLayout) -> None:
    """Build the initial student once and upload it to ``layout.init_model`` (workers and samplers download it):
    one vocabulary for every worker and the sampler."""
    if storage.is_complete(layout.init_model):
        return
    torch.manual_seed(cfg.train.seed)  # a tiny student's random init is part of the run's reproducibility
    model, tokenizer = student_lib.load_student(cfg.student, tokenizer_texts(table.to_pylist()))
    with tempfile.TemporaryDirectory(prefix="qcrd-init-", dir=storage.cache_dir()) as tmp:
        student_lib.save_student(model, tokenizer, tmp)
        storage.upload_dir(tmp, layout.init_model)


def _fit(cfg: Config, files: list[str], layout: MethodLayout, resume_round: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables([storage.read_parquet(f).select(_TEACHER_COLUMNS) for f in files])
    _init_student(cfg, table, layout)
    too_long = _reject_long_prompts(cfg, table, layout)

    # Read before the trainer and the sampler hold their CPUs: on a small machine the read's planning tasks
    # would otherwise wait forever for a whole free CPU.
    fs, _ = storage.resolve(files[0])
    dataset = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs,
                                    num_cpus=_READ_NUM_CPUS)
    if too_long:
        dataset = dataset.filter(lambda row: row["id"] not in too_long)
        table = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(too_long)))))
    dataset = dataset.materialize()
    store = pool = None
    if method_spec(cfg).needs_student_negatives(cfg):
        name = "qcrd-snapshots-" + hashlib.sha1(layout.root.encode()).hexdigest()[:12]
        store = snapshot_store(name, cfg.snapshots.j, cfg.snapshots.neg_source, layout.snapshots,
                               max_restarts=cfg.snapshots.actor_restarts)
        ray.get(store.restore.remote(resume_round - 1))  # rounds past the checkpoint (all, on a fresh start) go
        examples = list(zip(table.column("id").to_pylist(), table.column("input").to_pylist()))
        pool = NegativePool.start(layout.init_model, store, examples, cfg.snapshots, seed=cfg.train.seed,
                                  student=cfg.student)
        pool.request(resume_round)  # starts as soon as the snapshot it needs is published
    # Ray Train's controller takes one worker report per health-check interval (default 2 s), so a report made
    # while the previous one waits blocks the step loop; 0.2 s keeps that wait negligible. The trainer hands
    # this variable on to its controller actor, locally and on a cluster.
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.2")
    tc = cfg.train
    storage_path, storage_fs = storage.train_storage(layout.train)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "layout": layout, "store": store, "negatives": pool},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.num_cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=storage.basename(layout.checkpoints), storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            # a lost worker: the worker group restarts from the latest checkpoint, within this call
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            callbacks=[FailureNotices(tc.max_failures)],
        ),
        datasets={"train": dataset},
        # a stable split (blocks in order); which worker gets which rows may still differ in a resumed run, so
        # each rank's RNG state is saved with its rows' key (train.loop)
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        # equal splits: each worker holds rows // workers (the driver follows rank 0's metrics for the display)
        with console.follow_training(f"train {cfg.train.method}", layout.metrics, tc.rounds, tc.round_steps
                                     or table.num_rows // tc.num_workers // (tc.batch_size * tc.grad_accum_steps)):
            trainer.fit()
    finally:
        if pool is not None:
            pool.shutdown()
        if store is not None:
            ray.kill(store)


def _reject_long_prompts(cfg: Config, table, layout: MethodLayout) -> set[str]:
    """Ids of the teacher rows whose ``predict:`` or ``explain:`` prompt is longer than ``student.max_input_len``
    tokens: written with their reason to ``RUN/<method>/train/rejects.jsonl`` and left out of training (a prompt
    is never truncated silently)."""
    model_dir = storage.download_dir(layout.init_model)
    family, tokenizer = student_lib.family_of_dir(model_dir)
    rejects = student_lib.long_prompts(family, tokenizer, table.select(["id", "input"]).to_pylist(),
                                       cfg.student.max_input_len)
    if rejects:
        storage.write_jsonl(layout.train_rejects, rejects)
        console.summary(f"train: {len(rejects)} of {table.num_rows} examples left out, their prompt is longer than "
                        f"student.max_input_len={cfg.student.max_input_len} tokens (ids in {layout.train_rejects})")
    return {r["id"] for r in rejects}


def export_model(checkpoint: storage.Location, layout: MethodLayout, cfg: Config) -> str:
    """Upload a checkpoint's student (HF format) and D to ``layout.model`` (a path or a URI), its completeness
    marker last: a reader (``storage.download_dir``) never takes a half-exported model. A LoRA student is exported
    twice: merged into its base at ``layout.model`` (the default for eval and serve, loadable by any HF or vLLM
    loader) and as the adapter alone at ``layout.adapter``, its ``adapter_config.json`` naming the base (the hub
    model, or the run's initial student)."""
    source = storage.download_dir(checkpoint)
    with tempfile.TemporaryDirectory(prefix="qcrd-export-", dir=storage.cache_dir()) as tmp:
        if lora.is_adapter_dir(source / ckpt.MODEL_DIR):
            model, tokenizer = student_lib.load_for_training(cfg.student, storage.download_dir(layout.init_model),
                                                             source / ckpt.MODEL_DIR)
            student_lib.save_student(lora.merged(model), tokenizer, tmp)
            with tempfile.TemporaryDirectory(prefix="qcrd-export-adapter-", dir=storage.cache_dir()) as adapter:
                shutil.copytree(source / ckpt.MODEL_DIR, adapter, dirs_exist_ok=True)
                lora.set_base(adapter, cfg.student.model if cfg.student.model != "tiny" else layout.init_model)
                storage.upload_dir(adapter, layout.adapter)
        else:
            shutil.copytree(source / ckpt.MODEL_DIR, tmp, dirs_exist_ok=True)
        if (source / ckpt.DISC_FILE).is_file():
            shutil.copy2(source / ckpt.DISC_FILE, os.path.join(tmp, ckpt.DISC_FILE))
        storage.upload_dir(tmp, layout.model)
    return os.fspath(layout.model)


def _last_metrics(location: str) -> dict:
    """The last per-step metrics line (round-end lines hold only timings)."""
    steps = [m for m in console.read_metrics(location) if "loss" in m]
    return steps[-1] if steps else {}
