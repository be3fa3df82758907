"""The training loop every Ray Train worker runs, top to bottom: data shard → model → resume → rounds.

One loop serves every method (``cfg.train.method``; the step itself is ``qcrd.step.DistillModel``). A round is
``train.round_steps`` optimizer steps (0 = one epoch of this worker's shard). At each round end: collect the next
round's student negatives (sampled meanwhile from the lagged snapshot), refresh D on them, checkpoint, publish the
new snapshot, decay α3.

Everything a worker needs comes in ``loop_config`` (see ``trainer.run_training``): ``cfg``, ``layout`` (the
method's ``runs.MethodLayout``: a local path or a URI, reached through ``qcrd_ray.storage`` only), ``store``
(SnapshotStore handle, when the run samples student negatives) and ``negatives`` (NegativePool or None).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from qcrd_ray import provenance, storage
from qcrd_ray import students as student_lib
from qcrd_ray.methods import method_spec
from qcrd_ray.qcrd import losses
from qcrd_ray.qcrd.discriminator import Discriminator, pretrain_discriminator, refresh
from qcrd_ray.actors.snapshots import Publisher, cpu_state_dict
from qcrd_ray.qcrd.step import DistillModel, accumulate, make_batch
from qcrd_ray.runs import MethodLayout
from qcrd_ray.train import checkpoint as ckpt

log = logging.getLogger(__name__)

# Ray Data hands the shard over in blocks of this many rows (the shard is then held in memory, see shard_rows).
_READ_BATCH = 1024
# rank 0 rewrites metrics.jsonl at most this often while steps run (the driver's progress display reads it)
_METRICS_UPLOAD_S = 2.0


def shard_rows(shard) -> list[dict]:
    """This worker's teacher rows as dicts. Held in memory so a round can end mid-epoch and a resumed run can
    replay the exact data order (a seeded permutation per epoch) without re-reading the stream."""
    rows: list[dict] = []
    for table in shard.iter_batches(batch_size=_READ_BATCH, batch_format="pyarrow"):
        rows.extend(table.to_pylist())
    return sorted(rows, key=lambda r: r["id"])  # independent of the order blocks arrive in


def batch_rows(rows: list[dict], step: int, batch_size: int, steps_per_epoch: int, seed: int) -> list[dict]:
    """The rows of optimizer step ``step``: epoch ``step // steps_per_epoch`` of a seeded shuffle (pure)."""
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    return [rows[i] for i in order[index * batch_size:(index + 1) * batch_size]]


def with_negatives(rows: list[dict], negatives: dict) -> list[dict]:
    """Attach each row's student negative ``(text, snapshot round)`` as ``student_negatives`` / ``negative_round``."""
    out = []
    for row in rows:
        if row["id"] in negatives:
            text, snap_round = negatives[row["id"]]
            row = {**row, "student_negatives": [text], "negative_round": snap_round}
        out.append(row)
    return out


def negative_lag(round_index: int, batches) -> tuple[float, int]:
    """Sum and count of the lags of the batches' student negatives: rounds between ``round_index`` and the snapshot
    each came from. An example whose negative the pool could not deliver this round (``NegativePool.fetch``: it
    trains on teacher negatives) has no round and no lag (pure)."""
    lags = [round_index - r for b in batches for r in b.negative_rounds if r is not None]
    return float(sum(lags)), len(lags)


def _all_reduce_mean(values: dict, device) -> dict[str, float]:
    """The ranks' mean of each metric (tensors or numbers), read as Python floats: the one device sync of a logged
    step (accumulate keeps them as tensors)."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device) for k in keys])
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def _all_reduce_min(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def negative_records(negatives: dict) -> list[dict]:
    """The student negatives of a round as ``negatives.jsonl`` lines (for inspection and the report's plot)."""
    return [{"id": example_id, "text": text, "round": snap_round}
            for example_id, (text, snap_round) in sorted(negatives.items())]


def kept_metrics(text: str, resume_step: int) -> list[dict]:
    """The metrics lines a run resumed at ``resume_step`` keeps: what was logged after its checkpoint is replayed,
    so it is dropped (a restarted worker group never duplicates a line)."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [m for m in lines if m.get("step", 0) <= resume_step]


class RankZeroLog:
    """Rank 0's outputs on the run's storage (a path or a URI): ``metrics.jsonl``, TensorBoard event files and
    ``negatives.jsonl``, written by one background thread so no storage write sits on the step loop.

    An object store cannot append, so ``metrics.jsonl`` is rewritten whole (atomically) at most every
    ``_METRICS_UPLOAD_S`` while steps run (the driver's display follows it) and once at each round end *before*
    the round's checkpoint (:meth:`sync`), so a checkpoint never holds steps the file lacks. TensorBoard writes
    into a node-local folder whose event files are uploaded at each round end.

    A write that fails (storage down past its own retries) does not fail training, which would spend one of
    ``train.max_failures`` on a flaky bucket: it is logged, what it held stays in memory, and it is tried again
    with the next write. Each output is rewritten whole from memory, so a retry carries everything since. Only
    :meth:`close` raises, if storage is still failing at the end."""

    def __init__(self, layout: MethodLayout, resume_step: int, cfg=None):
        from torch.utils.tensorboard import SummaryWriter

        from qcrd_ray.trackers import open_trackers

        self.trackers = open_trackers(cfg, layout.root) if cfg is not None else []  # train.trackers beyond TB
        self.layout = layout
        previous = storage.read_text(layout.metrics) if storage.exists(layout.metrics) else ""
        self.lines = [json.dumps(m) for m in kept_metrics(previous, resume_step)]
        self.negative_lines: list[dict] = []
        self.tb_dir = tempfile.mkdtemp(prefix="tensorboard-", dir=storage.cache_dir("train"))
        self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qcrd-rank0-log")
        self.pending: list[concurrent.futures.Future] = []
        self.last_upload = float("-inf")
        self.writes = {"metrics.jsonl": self._write_metrics, "negatives.jsonl": self._write_negatives,
                       "tensorboard": self._write_tensorboard}
        self.unwritten: set[str] = set()  # outputs whose last write failed (changed on the writer thread only)

    def _submit(self, fn, *args) -> None:
        still = []
        for future in self.pending:
            if future.done():
                future.result()  # a failed tracker call fails the worker here rather than going unnoticed
            else:
                still.append(future)
        self.pending = still + [self.pool.submit(fn, *args)]

    def _store(self, name: str) -> None:
        """Write output ``name`` on the writer thread; a storage failure is logged and the output kept back."""
        def attempt():
            try:
                self.writes[name]()
            except OSError as e:  # pyarrow's storage errors, a full disk
                if name not in self.unwritten:
                    log.warning("rank 0 could not write %s (%s); kept in memory, tried again with the next write",
                                name, e)
                self.unwritten.add(name)
            else:
                if name in self.unwritten:
                    self.unwritten.discard(name)
                    log.info("rank 0 wrote %s again after a storage failure", name)
        self._submit(attempt)

    def _store_all(self, *names: str) -> None:
        """Write ``names`` and every output a failure kept back."""
        for name in sorted({*names, *self.unwritten}):
            self._store(name)

    def _idle(self) -> bool:
        return all(future.done() for future in self.pending)

    def _write_metrics(self) -> None:
        storage.write_text(self.layout.metrics, "".join(line + "\n" for line in list(self.lines)))

    def _write_negatives(self) -> None:
        storage.write_jsonl(self.layout.negatives, self.negative_lines)

    def _write_tensorboard(self) -> None:
        self.tb.flush()
        for path in sorted(Path(self.tb_dir).iterdir()):
            storage.write_bytes(storage.join(self.layout.tensorboard, path.name), path.read_bytes())

    def write(self, metrics: dict) -> None:
        self.lines.append(json.dumps(metrics))
        for key, value in metrics.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, metrics["step"])
        for tracker in self.trackers:  # on the writer thread: a tracker's network call never blocks a step
            self._submit(tracker.log, dict(metrics), metrics["step"])
        # idle only: while storage fails each write waits out its retries, and they must not pile up
        if self._idle() and (self.unwritten or time.monotonic() - self.last_upload >= _METRICS_UPLOAD_S):
            self.last_upload = time.monotonic()
            self._store_all("metrics.jsonl")

    def negatives(self, negatives: dict) -> None:
        self.negative_lines = negative_records(negatives)
        self._store("negatives.jsonl")

    def sync(self) -> None:
        """Every line so far stored (blocks; a storage failure is only logged), and the TensorBoard files
        uploaded in the background."""
        self._store_all("metrics.jsonl")
        self.drain()
        self._store("tensorboard")

    def drain(self) -> None:
        for future in self.pending:
            future.result()
        self.pending = []

    def close(self) -> None:
        self.drain()
        self.tb.close()
        self._store_all("metrics.jsonl", "tensorboard")
        for tracker in self.trackers:
            self._submit(tracker.close)
        self.drain()
        self.pool.shutdown()
        shutil.rmtree(self.tb_dir, ignore_errors=True)
        if self.unwritten:  # storage failing for good: the run must not end with its record missing
            raise storage.StorageError(f"rank 0 could not write {', '.join(sorted(self.unwritten))} to "
                                       f"{self.layout.train}: storage still failing (see the warnings above)")


def resume_checkpoint(checkpoints: storage.Location):
    """The checkpoint a worker group starts from: the newest complete one under ``checkpoints`` (``ckpt.latest``,
    a path or a URI), or None. The one source of the resume point: the driver sets the negative sampler and the
    snapshot store up from the same call, and a group restarted within a call asks again. Not Ray Train's
    ``get_checkpoint()``: it records a checkpoint only after the upload, so a worker or driver killed in between
    leaves a complete checkpoint it would not hand over (the group would start at round 0 while the store and
    sampler expect the later round)."""
    latest = ckpt.latest(checkpoints)
    if latest is None:
        return None
    fs, path = storage.resolve(latest)
    return ray.train.Checkpoint(path, filesystem=fs)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = loop_config["cfg"]
    spec = method_spec(cfg)
    tc = cfg.train
    layout: MethodLayout = loop_config["layout"]
    store, pool = loop_config.get("store"), loop_config.get("negatives")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)
    random.seed(tc.seed + rank)

    # ---- data: this worker's shard of the teacher rows; every rank takes the same number of steps per epoch
    rows = shard_rows(ray.train.get_dataset_shard("train"))
    step_rows = tc.batch_size * tc.grad_accum_steps  # one optimizer step: grad_accum_steps micro-batches
    steps_per_epoch = _all_reduce_min(len(rows) // step_rows, device)
    if steps_per_epoch == 0:
        raise ValueError(f"a worker holds fewer than train.batch_size × train.grad_accum_steps={step_rows} rows; "
                         f"lower them or the number of workers ({world})")
    round_steps = tc.round_steps or steps_per_epoch
    # Which rows a rank gets is up to Ray Data's split, and may differ in a resumed run: each rank's RNG state (its
    # dropout stream, advanced by the shapes of its own batches) is saved and restored with its rows, not its rank
    shard_key = hashlib.sha1("\n".join(str(r["id"]) for r in rows).encode()).hexdigest()
    log.info("rank %d: %d rows (shard %s)", rank, len(rows), shard_key[:12])

    # ---- model: resume from the last checkpoint, else the initial student the driver built
    checkpoint = resume_checkpoint(layout.checkpoints)
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        resume_dir = Path(resume_dir) if resume_dir else None
        # the initial student: downloaded from the run's storage into this node's cache (a local run: read in
        # place), with LoRA adapters when student.lora is on; a resumed run takes the checkpoint's weights on top
        needs_init = cfg.student.lora.r or not resume_dir  # a full-weights checkpoint holds the whole student
        student, tokenizer = student_lib.load_for_training(
            cfg.student, storage.download_dir(layout.init_model) if needs_init else None,
            resume_dir / ckpt.MODEL_DIR if resume_dir else None)
        family = student_lib.family_of(student)
        disc = Discriminator.from_student(student, cfg.discriminator) if spec.needs_discriminator(cfg) else None
        model = DistillModel(student, disc, cfg)
        # fused: one kernel over all parameters (CPU and GPU), 2-4× faster than the per-tensor loop at T5-small size
        optimizer = torch.optim.AdamW(model.param_groups(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (tc.warmup_steps + 1)))  # linear warmup, then constant
        if resume_dir:
            state = ckpt.load_state(resume_dir)
            if disc is not None:
                disc.load_state_dict(torch.load(resume_dir / ckpt.DISC_FILE, weights_only=True))
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            if len(state.rng) == world:  # the state of the rank that held these rows (shards are not pinned to ranks)
                ckpt.set_rng_state(next((r for r in state.rng if r.get("shard") == shard_key), state.rng[rank]),
                                   model.generators)
            start_round, global_step = state.completed_rounds, state.global_step
            log.info("rank %d: resuming at round %d (step %d)", rank, start_round, global_step)
    if not resume_dir:
        start_round, global_step = 0, 0
        if disc is not None:  # every rank on its own rows, gradients averaged: every rank ends with the same D
            stats = pretrain_discriminator(disc, tokenizer, rows, cfg, seed=tc.seed)
            log.info("discriminator pre-training: %s", stats)
    if rank == 0:  # what this start's floats depend on: same seed, same student only on a like machine
        provenance.record_start(layout.environment, step=global_step, world_size=world)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": spec.find_unused_parameters})
    core = model.module if hasattr(model, "module") else model

    # ---- negatives: publish the student this round starts from; the sampler works one round ahead
    publisher = Publisher(store) if rank == 0 and store is not None else None
    if publisher:
        publisher.publish(start_round, cpu_state_dict(core.student))
    metrics_log = RankZeroLog(layout, global_step, cfg) if rank == 0 else None
    negatives, neg_wait, neg_missing = {}, 0.0, 0
    if pool is not None and start_round < tc.rounds:
        t0 = time.perf_counter()
        if publisher:  # a publish that failed for good raises here, not as a sampler's wait for it
            publisher.confirm()
        negatives = pool.fetch(start_round)
        neg_wait, neg_missing = time.perf_counter() - t0, pool.last_fetch_missing  # missing: teacher negatives
        if rank == 0:
            _check_cut_off(pool, negatives, cfg)

    for round_index in range(start_round, tc.rounds):
        if rank == 0 and pool is not None and round_index + 1 < tc.rounds:
            pool.request(round_index + 1)
        alpha3 = losses.alpha3_at_round(cfg.loss.alpha3, cfg.loss.alpha3_decay, round_index)
        round_start = tick = time.perf_counter()
        since_log = 0
        model.train()
        for _ in range(round_steps):
            rows_now = with_negatives(batch_rows(rows, global_step, step_rows, steps_per_epoch, tc.seed), negatives)
            micro = [make_batch(rows_now[i:i + tc.batch_size], tokenizer, cfg, family).to(device)
                     for i in range(0, step_rows, tc.batch_size)]
            optimizer.zero_grad(set_to_none=True)
            step_metrics = accumulate(model, micro, alpha3)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            global_step += 1
            since_log += 1
            if global_step % tc.log_every == 0:
                if pool is not None:
                    step_metrics["neg_lag_sum"], step_metrics["neg_lag_n"] = negative_lag(round_index, micro)
                metrics = _all_reduce_mean(step_metrics, device)
                if pool is not None:  # the mean over every rank's examples that had a student negative
                    lag_sum, lag_n = metrics.pop("neg_lag_sum"), metrics.pop("neg_lag_n")
                    if lag_n:
                        metrics["neg_lag"] = lag_sum / lag_n
                now = time.perf_counter()
                metrics.update(step=global_step, round=round_index, lr=scheduler.get_last_lr()[0],
                               alpha3=alpha3, examples_per_s=world * step_rows * since_log / (now - tick),
                               neg_wait_s=neg_wait, neg_missing=neg_missing)
                tick, since_log = now, 0
                if metrics_log:
                    metrics_log.write(metrics)
                ray.train.report(metrics)

        # ---- round end: next negatives, D refresh, checkpoint, snapshot
        completed = round_index + 1
        round_s = time.perf_counter() - round_start
        neg_wait, neg_cut_off = 0.0, None
        if publisher:  # the snapshot published at the last round end (it had the whole round to be stored)
            publisher.confirm()
        if pool is not None and completed < tc.rounds:
            t0 = time.perf_counter()
            negatives = pool.fetch(completed)
            neg_wait, neg_missing = time.perf_counter() - t0, pool.last_fetch_missing
            neg_cut_off = _check_cut_off(pool, negatives, cfg) if rank == 0 else 0.0
            if metrics_log:
                metrics_log.negatives(negatives)
            if core.disc is not None:  # every rank on its own rows, gradients averaged (discriminator.py)
                refresh(core.disc, tokenizer, with_negatives(rows, negatives), cfg, seed=tc.seed + completed)
        rng = [None] * world
        dist.all_gather_object(rng, {**ckpt.rng_state(core.generators), "shard": shard_key})
        round_metrics = {"step": global_step, "completed_rounds": completed, "round_s": round_s,
                         "neg_wait_s": neg_wait, "neg_wait_share": neg_wait / round_s if round_s else 0.0,
                         "neg_missing": neg_missing, "time": time.time()}  # wall clock: round-to-round time
        if neg_cut_off is not None:  # this round end fetched negatives
            round_metrics["neg_cut_off_share"] = neg_cut_off
        if metrics_log:  # stored before the checkpoint: a run resumed from it finds every line up to it
            metrics_log.write(round_metrics)
            metrics_log.sync()
        with tempfile.TemporaryDirectory(dir=storage.cache_dir("train")) as tmp:
            saved = None
            if rank == 0:
                next_alpha3 = losses.alpha3_at_round(cfg.loss.alpha3, cfg.loss.alpha3_decay, completed)
                state = ckpt.TrainerState(completed, global_step, next_alpha3, optimizer.state_dict(),
                                          scheduler.state_dict(), rng)
                saved = ray.train.Checkpoint.from_directory(
                    str(ckpt.save(tmp, core.student, tokenizer, core.disc, state)))
            ray.train.report(round_metrics, checkpoint=saved, checkpoint_dir_name=ckpt.round_dir_name(completed))
        if publisher and completed < tc.rounds:
            publisher.publish(completed, cpu_state_dict(core.student))  # after the checkpoint: see trainer.py
    if metrics_log:
        metrics_log.close()


def _check_cut_off(pool, negatives: dict, cfg) -> float:
    """Share of the fetched student negatives that stopped at ``snapshots.max_new_tokens`` before their end; a
    warning when most did (a cut-off negative has no answer: D and the contrastive term then learn "cut off =
    bad", which the testbed's first study run did with 599 of 600). Not for the initial student's negatives: a
    from-scratch student babbles to the limit before it has learnt to stop."""
    share = pool.last_fetch_cut_off / max(len(negatives), 1)
    if share > 0.5 and any(snap_round > 0 for _, snap_round in negatives.values()):
        log.warning("%.0f %% of the student negatives were cut off at snapshots.max_new_tokens=%d before their "
                    "answer; raise it to about the length of a rationale and its answer (student.max_target_len=%d)",
                    100 * share, cfg.snapshots.max_new_tokens, cfg.student.max_target_len)
    return share
