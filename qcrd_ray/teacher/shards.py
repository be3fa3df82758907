"""Output shards: the unit of resumption.

Examples are cut, in input order, into shards of ``shard_rows``; shard i is ``part-0000i.parquet`` in
TEACHER_SCHEMA, written atomically through ``qcrd_ray.storage`` (a local path or a URI such as ``s3://``), so a
shard file either holds all its examples or does not exist. A rerun regenerates exactly the missing shards; per-sample
seeds make them equal to what an uninterrupted run writes. A manifest pins what the shards were made from, so
a rerun with other data or other teacher settings fails loudly instead of mixing two runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import pyarrow as pa

from qcrd_ray import storage
from qcrd_ray.config import Config, ConfigError
from qcrd_ray.data.schema import TEACHER_SCHEMA
from qcrd_ray.teacher.consistency import teacher_row
from qcrd_ray.teacher.sources import resolve_sources

MANIFEST = "manifest.json"
# teacher settings that change what is generated (pool sizes and batch sizes do not)
OUTPUT_KEYS = ("backend", "model", "k", "temperature", "max_tokens", "stop", "seed", "api", "shard_rows")
# a mix of sources (teacher.sources) also pins each source's own: its samples and the settings that make them
# (a single teacher's manifest is as it always was, so its folders made before sources existed still resume)
SOURCE_OUTPUT_KEYS = ("backend", "model", "temperature", "max_tokens", "stop", "seed", "api", "base_url", "noise",
                      "hard_share")


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first example (position in the split)
    stop: int  # one past the last example
    path: str  # location (storage.join of the output folder and part-NNNNN.parquet)

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_shards(n_examples: int, shard_rows: int, out_dir: storage.Location) -> list[Shard]:
    return [
        Shard(i, start, min(start + shard_rows, n_examples), storage.join(out_dir, f"part-{i:05d}.parquet"))
        for i, start in enumerate(range(0, n_examples, shard_rows))
    ]


def manifest(cfg: Config, split: str, ids: Sequence[str]) -> dict:
    teacher = {key: _plain(getattr(cfg.teacher, key)) for key in OUTPUT_KEYS}
    if cfg.teacher.sources:
        teacher["sources"] = [{"name": s.name, "weight": s.weight, "samples": list(s.indices),
                               **{key: _plain(getattr(s.cfg.teacher, key)) for key in SOURCE_OUTPUT_KEYS}}
                              for s in resolve_sources(cfg)]
    return {
        "task": cfg.data.task,
        "split": split,
        "examples": len(ids),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "teacher": teacher,
        "positive_rule": cfg.self_consistency.positive_rule,
    }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def check_manifest(out_dir: storage.Location, current: dict) -> None:
    """Write the manifest of a new output folder, or check that an existing one matches this run."""
    path = storage.join(out_dir, MANIFEST)
    previous = storage.read_json(path)
    if previous is None:
        storage.write_json(path, current)
        return
    if previous == current:
        return
    diff = [k for k in sorted(set(previous) | set(current)) if previous.get(k) != current.get(k)]
    if "teacher" in diff:
        pt, ct = previous.get("teacher", {}), current["teacher"]
        diff = [d for d in diff if d != "teacher"] + [f"teacher.{k}" for k in (*OUTPUT_KEYS, "sources")
                                                      if pt.get(k) != ct.get(k)]
    raise ConfigError(
        f"{out_dir} holds teacher output of a different run ({', '.join(diff)} differ); "
        "use a new --out folder, or delete this one to start over"
    )


class ShardCollector:
    """Gathers parsed sample rows, which arrive in any order, and returns each shard's TEACHER_SCHEMA table as
    soon as every one of its samples is in. Samples are keyed by (example id, sample index), not counted: a
    sample delivered twice (a retried task whose first attempt got through) is kept once and counted in
    ``duplicates``, and a sample naming an example outside its shard is an error. Examples keep their input order,
    samples their index order. ``examples``: the split, an EXAMPLE_SCHEMA table (a shard's rows become Python
    objects only while that shard is assembled) or its rows."""

    def __init__(self, shards: Sequence[Shard], examples: pa.Table | Sequence[Mapping], k: int, task, rule: str):
        self.examples, self.k, self.task, self.rule = examples, k, task, rule
        self.pending = {s.index: s for s in shards}
        self.samples: dict[int, dict[tuple[str, int], dict]] = {s.index: {} for s in shards}
        self.duplicates = 0

    def _rows(self, shard: Shard) -> list[dict]:
        if isinstance(self.examples, pa.Table):
            return self.examples.slice(shard.start, shard.size).to_pylist()
        return list(self.examples[shard.start : shard.stop])

    def add(self, batch: pa.Table) -> list[tuple[Shard, pa.Table]]:
        touched = set()
        for row in batch.to_pylist():
            shard, key = row["shard"], (row["id"], row["sample_index"])
            if shard not in self.pending:
                if shard in self.samples:  # that shard is written: a late duplicate of one of its samples
                    self.duplicates += 1
                    continue
                raise RuntimeError(f"sample {key} names shard {shard}, which this run does not generate")
            if not 0 <= key[1] < self.k:
                raise RuntimeError(f"sample {key} of shard {shard}: sample index outside 0..{self.k - 1}")
            if key in self.samples[shard]:
                self.duplicates += 1
                continue
            self.samples[shard][key] = {"index": key[1],
                                        **{c: row.get(c) for c in ("text", "rationale", "answer", "status", "error")}}
            touched.add(shard)
        return [self._finish(i) for i in sorted(touched) if len(self.samples[i]) == self.pending[i].size * self.k]

    def _finish(self, index: int) -> tuple[Shard, pa.Table]:
        shard = self.pending.pop(index)
        examples = self._rows(shard)
        by_id: dict[str, list[dict]] = {ex["id"]: [] for ex in examples}
        for (example_id, _), sample in self.samples[index].items():
            if example_id not in by_id:
                raise RuntimeError(f"shard {index} got samples of example {example_id!r}, which is not in it")
            by_id[example_id].append(sample)
        self.samples[index] = {}  # done: memory back; the key stays so a late duplicate is recognised
        rows = [teacher_row(ex, sorted(by_id[ex["id"]], key=lambda s: s["index"]), self.task, self.rule)
                for ex in examples]
        return shard, pa.Table.from_pylist(rows, schema=TEACHER_SCHEMA)

    @property
    def unfinished(self) -> list[int]:
        return sorted(self.pending)


def kept_shards(shards: Sequence[Shard], present: set[str]) -> tuple[list[Shard], list[Shard]]:
    """(kept, refetch) among the planned shards whose file is ``present``: a kept shard's Parquet footer must hold
    exactly the shard's example count (one row per example); a truncated, empty or unreadable file is generated
    again rather than trusted."""
    kept, refetch = [], []
    for shard in shards:
        if shard.path in present:
            (kept if storage.parquet_num_rows(shard.path) == shard.size else refetch).append(shard)
    return kept, refetch
