"""Negative sampler: actors that write the student negatives of a round from the lagged snapshot.

For round ``r`` each actor fetches snapshot ``r - j`` from the :class:`~qcrd_ray.actors.snapshots.SnapshotStore`
(the oldest held during the first rounds), samples one ``explain:`` output per training example at temperature
``snapshots.temperature`` (1.5) with its engine (``snapshots.engine``: Hugging Face ``generate``, or vLLM on GPU
nodes; qcrd_ray/students/engines.py), and tags each with the snapshot's round. Under LoRA a snapshot is the
adapter alone, loaded onto the actor's copy of the initial student. The
trainer asks for round ``r + 1`` when round ``r`` starts, so sampling overlaps training; at the next round start
the workers only collect the finished result (the wait is logged as ``neg_wait_s``).

The actors are asyncio actors: generation runs in one background thread, so a worker collecting a finished round
is answered at once even while the next round is being sampled, whatever order the requests arrive in.

Faults: the initial student reaches the actors as its files' bytes in the object store (never a path on the
driver's disk). Ray restarts a killed actor (``snapshots.actor_restarts``), which loads that student again, and
retries the requests in flight; sampling is seeded by round, so a restarted actor writes the same negatives. An
actor lost for good (restarts used up) costs its examples their student negatives: :meth:`NegativePool.fetch`
returns the rest and counts them in ``last_fetch_missing``, and those examples train on teacher negatives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import ray

from qcrd_ray import storage
from qcrd_ray.config import SnapshotConfig, StudentConfig
from qcrd_ray.data import prompts
from qcrd_ray.students.engines import build_engine

# A snapshot can be asked for just before rank 0's publish of it has reached the store (j = 0); wait this long.
_SNAPSHOT_WAIT_S = 600.0
_POLL_S = 0.05

Negatives = dict[str, tuple[str, int]]  # example id -> (sampled explain output, snapshot round it came from)

log = logging.getLogger(__name__)


def model_files(location: storage.Location) -> dict[str, bytes]:
    """Every file of the model folder at ``location`` (a path, or a URI uploaded with ``storage.upload_dir``) by
    relative path: the student as it travels to the sampler actors through the object store."""
    folder = storage.download_dir(location) if storage.is_uri(location) else Path(location)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"no model files at {location}: pass the folder the initial student was saved to")
    return files


def write_model_files(files: dict[str, bytes], folder: str | Path) -> Path:
    """:func:`model_files`' output written back as a model folder on this node."""
    for rel, data in files.items():
        path = Path(folder, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Path(folder)


@ray.remote
class NegativeSampler:
    """Samples the negatives of one shard of the training examples (see the module docstring)."""

    def __init__(self, files: dict[str, bytes], store, examples: Sequence[tuple[str, str]], cfg: SnapshotConfig,
                 seed: int, student: StudentConfig = StudentConfig()):
        import torch

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        # the folder lives as long as the actor (a vLLM engine reads the base model from it)
        self._folder = tempfile.TemporaryDirectory(prefix="qcrd-sampler-", dir=storage.cache_dir())
        self.engine = build_engine(cfg.engine, write_model_files(files, self._folder.name), student, cfg)
        self.store = store
        self.ids = [i for i, _ in examples]
        self.inputs = [prompts.student_input("explain", text) for _, text in examples]
        self.cfg = cfg
        self.seed = seed
        self.loaded_round: int | None = None
        self._rounds: dict[int, asyncio.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one generation at a time

    async def sample(self, round_index: int) -> tuple[Negatives, int]:
        """The negatives of ``round_index`` (started on the first request, shared by every later one) and how many
        of them were cut off at ``snapshots.max_new_tokens``."""
        if round_index not in self._rounds:
            self._rounds[round_index] = asyncio.ensure_future(self._sample(round_index))
            for old in [r for r in self._rounds if r < round_index - 1]:
                del self._rounds[old]  # rounds the trainer has moved past
        return await asyncio.shield(self._rounds[round_index])

    async def _sample(self, round_index: int) -> tuple[Negatives, int]:
        deadline = time.monotonic() + _SNAPSHOT_WAIT_S
        while True:
            try:
                snap_round, ref = await self.store.get.remote(round_index)
                state = await ref
                break
            except LookupError:  # Ray re-raises the actor's LookupError as a subclass of it
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(_POLL_S)
            except ray.exceptions.ObjectLostError:  # the store died after answering: ask its restarted self
                if time.monotonic() > deadline:
                    raise
        loop = asyncio.get_running_loop()
        texts, cut_off = await loop.run_in_executor(self._pool, self._generate, snap_round, state, round_index)
        # an input that exhausted memory alone (None) leaves its example without a student negative this round
        return {i: (t, snap_round) for i, t in zip(self.ids, texts) if t is not None}, sum(cut_off)

    def _generate(self, snap_round: int, state: dict, round_index: int) -> tuple[list[str], list[bool]]:
        if snap_round != self.loaded_round:
            self.engine.load(snap_round, state)
            self.loaded_round = snap_round
        return self.engine.sample(self.inputs, temperature=self.cfg.temperature, seed=self.seed + 7919 * round_index,
                                  max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.sampler_batch_size)


class NegativePool:
    """The sampler actors of a run, sharded over the examples; a plain object, so it travels to train workers."""

    def __init__(self, actors: list, shard_sizes: list[int], files: ray.ObjectRef):
        self.actors = actors
        self.shard_sizes = shard_sizes
        # Ray does not keep an actor's constructor arguments for its restarts (ray-project/ray#53727): a restarted
        # sampler reads the student's files through this reference, held as long as the pool
        self.files = files
        self.last_fetch_missing = 0  # examples of the last fetch whose actor was lost (restarts used up)
        self.last_fetch_cut_off = 0  # negatives of the last fetch cut off at snapshots.max_new_tokens

    @classmethod
    def start(cls, model_location: storage.Location, store, examples: Sequence[tuple[str, str]],
              cfg: SnapshotConfig, seed: int = 0, student: StudentConfig = StudentConfig()) -> "NegativePool":
        """Start ``snapshots.sampler_actors`` samplers of the initial student at ``model_location`` (a path the
        caller can read, or a URI; with ``student.lora`` the actors add the same adapters to it); its files go to
        them through the object store, once for all."""
        files = ray.put(model_files(model_location))
        n = min(cfg.sampler_actors, max(1, len(examples)))
        # scheduling_strategy DEFAULT: inside a Tune trial a child actor would otherwise be placed in the trial's
        # own placement group (a token 0.01 CPU; Ray Train's workers get a group of their own), where it never fits
        options = {"num_cpus": cfg.sampler_num_cpus, "num_gpus": cfg.sampler_num_gpus,
                   "max_restarts": cfg.actor_restarts, "max_task_retries": -1, "scheduling_strategy": "DEFAULT"}
        shards = [list(examples[i::n]) for i in range(n)]
        actors = [NegativeSampler.options(**options).remote(files, store, shard, cfg, seed + i, student)
                  for i, shard in enumerate(shards)]
        return cls(actors, [len(s) for s in shards], files)

    def request(self, round_index: int) -> None:
        """Start sampling ``round_index``'s negatives in the background (returns at once)."""
        for actor in self.actors:
            actor.sample.remote(round_index)

    def fetch(self, round_index: int) -> Negatives:
        """Every example's negative for ``round_index`` (waits only if sampling has not finished). The part of an
        actor that died for good (or whose snapshot store did), and an example whose input exhausted memory alone,
        are left out and counted in ``last_fetch_missing``: those examples train on teacher negatives."""
        out: Negatives = {}
        cut_off = 0
        refs = [actor.sample.remote(round_index) for actor in self.actors]
        for i, (ref, size) in enumerate(zip(refs, self.shard_sizes)):
            try:
                negatives, cut = ray.get(ref)
                out.update(negatives)
                cut_off += cut
            except ray.exceptions.RayActorError as e:  # after Ray's restarts and retries (also wraps the store's)
                log.warning("negative sampler %d lost for round %d (%s): its %d examples use teacher negatives",
                            i, round_index, type(e).__name__, size)
        self.last_fetch_missing, self.last_fetch_cut_off = sum(self.shard_sizes) - len(out), cut_off
        return out

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
