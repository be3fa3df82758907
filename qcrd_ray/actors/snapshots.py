"""SnapshotStore: one named Ray actor holding the student as it was in the last j + 1 rounds.

Snapshot ``r`` is the student's weights at the *start* of round ``r`` (round 0 = the initial student), so the
negatives of round ``r`` come from snapshot ``r - j`` (docs/design.md, "The algorithm"). Rank 0 publishes each
snapshot in one remote call; the actor ``ray.put``s it itself, so the object is owned by the actor and outlives the
trainer's workers (an object a worker puts dies with that worker).

With a ``location`` (a path or a URI, ``RUN/<method>/train/snapshots``) the actor writes each snapshot there
through :mod:`qcrd_ray.storage` (atomically) before it holds it, and deletes what leaves the ring. Ray restarts a
killed store (``snapshots.actor_restarts``) and retries the calls in flight; the new process reloads its ring from
the location in ``__init__``, so every round published before the kill is served again. A resumed run uses the
same reload.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from typing import Iterable

import ray
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from qcrd_ray import storage
from qcrd_ray.config import SnapshotConfig

log = logging.getLogger(__name__)

_FILE = re.compile(r"^round_(\d{4,})\.safetensors$")


def source_round(round_index: int, j: int, held: Iterable[int], neg_source: str = "lagged") -> int:
    """The snapshot that supplies round ``round_index``'s negatives: ``round_index - j``, or round 0 (the initial
    student, the oldest snapshot) while ``round_index < j``; ``neg_source="fixed"`` always answers round 0.

    ``LookupError`` when that snapshot is not published yet (callers wait and ask again); ``ValueError`` when it
    has already left the ring (answering a newer one would silently shorten the lag). Pure, tested without Ray.
    """
    held = sorted(held)
    wanted = 0 if neg_source == "fixed" else max(round_index - j, 0)
    if wanted in held:
        return wanted
    if held and wanted < held[0]:
        raise ValueError(f"snapshot {wanted} (round {round_index} - j {j}) has left the ring; held rounds: {held}")
    raise LookupError(f"snapshot {wanted} (round {round_index} - j {j}) is not published yet; held: {held}")


def rounds_to_keep(held: Iterable[int], j: int, neg_source: str = "lagged") -> list[int]:
    """The ring after a publish: the newest j + 1 rounds (plus round 0 when negatives always come from it)."""
    held = sorted(held)
    keep = set(held[-(j + 1):])
    if neg_source == "fixed" and 0 in held:
        keep.add(0)
    return sorted(keep)


class SnapshotState(dict):
    """A state dict that pickles fast: each distinct tensor goes out once (tied weights: T5's embedding is under 3-4
    keys) as a raw byte buffer, which pickle 5 hands to Ray out of band to copy straight into the object store.
    Torch's own tensor pickling copies through ``torch.save`` and costs ~10x more (benchmarks/train_ray.py).
    Unpickled tensors are views of the received buffer (read-only in Ray's object store; ``load_state_dict``
    copies from them) and keys that shared a tensor share it again."""

    def __reduce__(self):
        buffers: list = []
        index: dict[tuple, int] = {}
        entries = []
        for key, t in self.items():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident not in index:
                index[ident] = len(buffers)
                buffers.append(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            entries.append((key, index[ident], str(t.dtype).removeprefix("torch."), tuple(t.shape)))
        return _unpack_state, (buffers, entries)


def _unpack_state(buffers: list, entries: list) -> SnapshotState:
    tensors: dict[int, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # object-store memory: read, not written
        for _, i, dtype, shape in entries:
            if i not in tensors:
                tensors[i] = torch.from_numpy(buffers[i]).view(getattr(torch, dtype)).reshape(shape)
    return SnapshotState((key, tensors[i]) for key, i, _, _ in entries)


def cpu_state_dict(module: torch.nn.Module) -> SnapshotState:
    """The student's trainable weights as CPU tensors (no copy on CPU: the remote call serialises them before
    training goes on): every weight, or under LoRA the adapter alone (``students.lora.trainable_state``)."""
    from qcrd_ray.students.lora import trainable_state

    return SnapshotState((k, v.detach().cpu()) for k, v in trainable_state(module).items())


def snapshot_path(location: storage.Location, round_index: int) -> str:
    return storage.join(location, f"round_{round_index:04d}.safetensors")


def persisted_rounds(location: storage.Location) -> list[int]:
    """Rounds with a snapshot at ``location`` (a missing folder holds none)."""
    names = (storage.basename(p) for p in storage.list_files(location, "round_*.safetensors"))
    return sorted(int(m.group(1)) for n in names if (m := _FILE.match(n)))


def snapshot_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    # safetensors refuses tensors that share memory (tied embeddings): store contiguous clones
    return save_safetensors({k: v.contiguous().clone() for k, v in state_dict.items()})


@ray.remote(num_cpus=0)
class SnapshotStore:
    """Ring of ``round -> ObjectRef(state_dict)`` for the last j + 1 rounds (see the module docstring)."""

    def __init__(self, j: int, neg_source: str = "lagged", location: str | None = None):
        self.j = j
        self.neg_source = neg_source
        self.location = location
        self._ring: dict[int, ray.ObjectRef] = {}
        if location:
            storage.remove_partial_writes(location)  # a store killed mid-write (local path) leaves a temporary
            for r in persisted_rounds(location):
                self._ring[r] = ray.put(SnapshotState(load_safetensors(storage.read_bytes(snapshot_path(location, r)))))
            if self._ring:
                log.info("snapshot store: reloaded rounds %s from %s", sorted(self._ring), location)
            self._prune()  # a kill between a publish's write and its prune left one round too many

    def publish(self, round_index: int, state_dict: dict[str, torch.Tensor]) -> list[int]:
        """Hold ``state_dict`` as snapshot ``round_index`` (replacing one of that round); returns the held rounds.
        Persisted first: a round this call acknowledged survives the store's death."""
        if self.location:
            storage.write_bytes(snapshot_path(self.location, round_index), snapshot_bytes(state_dict))
        self._ring[round_index] = ray.put(state_dict)
        return self._prune()

    def restore(self, up_to_round: int) -> list[int]:
        """Forget the snapshots of rounds > ``up_to_round`` (a run resumed from the checkpoint of that round
        republishes them); returns the held rounds (the rest was reloaded when the store started)."""
        if not self.location:
            raise RuntimeError("SnapshotStore.restore needs a location to reload from")
        for r in [r for r in self._ring if r > up_to_round]:
            del self._ring[r]
            storage.delete(snapshot_path(self.location, r))
        return sorted(self._ring)

    def _prune(self) -> list[int]:
        keep = rounds_to_keep(self._ring, self.j, self.neg_source)
        for r in list(self._ring):
            if r not in keep:
                del self._ring[r]
                if self.location:
                    storage.delete(snapshot_path(self.location, r))
        return sorted(self._ring)

    def get(self, round_index: int) -> tuple[int, ray.ObjectRef]:
        """``(snapshot round, ref to its state dict)`` supplying round ``round_index``'s negatives."""
        r = source_round(round_index, self.j, self._ring, self.neg_source)
        return r, self._ring[r]

    def rounds(self) -> list[int]:
        return sorted(self._ring)


class SnapshotPublishError(RuntimeError):
    pass


# a publish the store failed (its storage down past its own retries) is sent again, up to this many tries in all,
# after PUBLISH_BACKOFF_S, then twice that...: long enough for a bucket's short outage, short of Ray Train's restart
PUBLISH_ATTEMPTS = 3
PUBLISH_BACKOFF_S = 5.0


class Publisher:
    """Rank 0's publishes. :meth:`publish` returns at once: the weights are copied into the object store first
    (training goes on changing them), the store persists them meanwhile. :meth:`confirm` waits for the store's
    answer and sends a failed publish again, each failure logged with its round and reason; the last failure
    raises :class:`SnapshotPublishError`, so training restarts from its checkpoint instead of the samplers
    waiting for a snapshot that never comes. A store lost for good (restarts spent) is only reported: the
    samplers' examples then get teacher negatives, as in :meth:`NegativePool.fetch`."""

    def __init__(self, store, attempts: int = PUBLISH_ATTEMPTS, backoff_s: float = PUBLISH_BACKOFF_S):
        self.store, self.attempts, self.backoff_s = store, attempts, backoff_s
        self._pending: tuple | None = None  # (round, weights' ref, the call's ref)

    def publish(self, round_index: int, state_dict: dict[str, torch.Tensor]) -> None:
        self.confirm()
        weights = ray.put(state_dict)  # one copy for every try
        self._pending = (round_index, weights, self.store.publish.remote(round_index, weights))

    def confirm(self) -> list[int] | None:
        """The rounds the store holds once the last publish is in (None: nothing pending, or the store is lost)."""
        if self._pending is None:
            return None
        round_index, weights, call = self._pending
        self._pending = None
        for attempt in range(1, self.attempts + 1):
            try:
                return ray.get(call)
            except ray.exceptions.RayActorError as e:
                log.warning("snapshot of round %d not published: the snapshot store is lost (%s)", round_index,
                            type(e).__name__)
                return None
            except ray.exceptions.RayTaskError as e:
                reason = f"{type(e.cause).__name__}: {e.cause}" if e.cause else str(e).splitlines()[0]
                if attempt == self.attempts:
                    log.error("snapshot of round %d not published after %d tries: %s", round_index, attempt, reason)
                    raise SnapshotPublishError(f"snapshot of round {round_index} not published after {attempt} "
                                               f"tries: {reason}") from e
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("snapshot of round %d: publish try %d of %d failed (%s); again in %.0f s", round_index,
                            attempt, self.attempts, reason, delay)
                time.sleep(delay)
                call = self.store.publish.remote(round_index, weights)


def snapshot_store(name: str, j: int, neg_source: str = "lagged", location: str | None = None,
                   max_restarts: int = SnapshotConfig.actor_restarts):
    """Get or create the named store (one per run; it lives as long as the driver that created it). Ray restarts
    it up to ``max_restarts`` times and retries the calls in flight, so handles keep working across a restart."""
    return SnapshotStore.options(name=name, get_if_exists=True, max_restarts=max_restarts, max_task_retries=-1,
                                 scheduling_strategy="DEFAULT",  # not in a Tune trial's group (NegativePool.start)
                                 ).remote(j, neg_source, location)
