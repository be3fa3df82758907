"""The interface of the actor-pool teacher backends, and their pool.

Such a backend is a Ray Data callable class: constructed once per actor with the run's config (its teacher
section: the source's settings, see `teacher.sources`), then called on batches of *sample rows* (one row per
example and sample index; see `teacher.samples`). It returns the batch with two more columns: ``text`` (the raw
teacher output, "" when there is none) and ``error`` (why there is no output, "" when there is one). A backend never
raises for one bad row or request: it records the reason (a row that crashes the backend is found by bisection and
recorded too; see ``TeacherBackend.__call__``). What a backend serves, needs and how its output is parsed is its
registry entry's (`teacher.backends.BACKENDS`), not the class's.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from qcrd_ray.isolation import ResultCountError, isolate_failures

if TYPE_CHECKING:  # annotations only: the config imports the backend registry
    from qcrd_ray.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str = ""
    error: str = ""  # non-empty: the request failed (status request_error), with the reason


class TeacherBackend(ABC):
    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def complete(self, rows: list[dict]) -> list[Completion]:
        """One completion per sample row, in order. Row keys: the example columns, ``sample_index``,
        ``source_index`` (the sample's place among this source's samples of the question), ``seed``, ``prompt``."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with ``text`` and ``error``. A batch on which the backend raises (a crash, not a failed request,
        which ``complete`` records itself) is bisected: the rows that crash it alone are retried
        ``teacher.poison_retries`` times, then recorded with the exception as their error (errors.jsonl, by id);
        every other row gets its completion."""
        rows = batch.to_pylist()
        attempts = 1 + self.cfg.teacher.poison_retries
        try:
            results = isolate_failures(self.complete, rows, attempts=attempts)
        except ResultCountError as e:  # a backend bug: every row of the batch says so, the job goes on
            log.exception("teacher backend %s broke its contract on a batch of %d rows", type(self).__name__,
                          len(rows))
            results = [e] * len(rows)
        poisoned = [row["id"] for row, r in zip(rows, results) if isinstance(r, BaseException)]
        if poisoned:
            log.error("teacher backend %s crashed on %d of %d rows, alone, %d times each (ids %s): recorded as errors",
                      type(self).__name__, len(poisoned), len(rows), attempts, ", ".join(poisoned[:5]))
        completions = [Completion(error=f"backend crashed on this row ({attempts} attempts): {type(r).__name__}: {r}")
                       if isinstance(r, BaseException) else r for r in results]
        return batch.append_column("text", pa.array([c.text for c in completions], pa.string())).append_column(
            "error", pa.array([c.error for c in completions], pa.string())
        )


class TeacherWorker:
    """One actor of a backend's pool: the backend (its model or HTTP client loaded once), then ``then`` (the parse)
    in the same stage, so a sample row crosses no extra stage."""

    def __init__(self, cfg: Config, module: str, cls: str, then):
        self.backend = getattr(importlib.import_module(module), cls)(cfg)
        self.then = then

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.then(self.backend(batch))


def actor_pool_stage(ds, cfg: Config, module: str, cls: str, then):
    """``ds`` (sample rows) through an autoscaling pool of ``module.cls`` actors sized by ``cfg.teacher``."""
    import ray

    t = cfg.teacher
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts/max_task_retries only as remote args, and warns on every run's console that
        # this form goes in 2.64, with no replacement yet: nothing a user could act on
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(
            TeacherWorker,
            fn_constructor_kwargs={"cfg": cfg, "module": module, "cls": cls, "then": then},
            batch_size=t.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=t.min_actors, max_size=t.max_actors),
            num_cpus=t.num_cpus,
            num_gpus=t.num_gpus,
            # A killed actor is restarted and the tasks it held are resubmitted to the pool. Outputs are a pure
            # function of (id, sample seed), so a sample that a retried task delivers twice is the same sample:
            # the ShardCollector keys samples by (id, sample index) and keeps each once. Bounded, so an actor
            # that keeps dying (OOM loading the model) fails the run.
            max_restarts=t.max_restarts,
            max_task_retries=-1 if t.max_restarts else 0,
        )
