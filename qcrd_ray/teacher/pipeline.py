"""The teacher stage on Ray Data: examples -> K sample rows each -> teacher backend -> parse -> group by
example -> self-consistency -> Parquet shards, resumable.

    per teacher source (one, unless teacher.sources mixes several; teacher/sources.py):
      ray.data.from_items(input block numbers)           # the split itself is one object-store table
        .map_batches(_expand_blocks)                     # the source's sample rows: own index and seed
        -> its registry entry's build(ds, cfg, parse)    # text/error, then parse (an actor pool; vLLM: its processor)
    union of the sources
      .iter_batches()  -> ShardCollector on the driver   # a shard is written the moment its K samples are in

Grouping happens on the driver per shard rather than with a Dataset groupby: a groupby is a barrier over the
whole split, while per-shard grouping streams, so finished shards reach disk (and survive a crash) while the
rest is still being generated. Every file goes through ``qcrd_ray.storage``, so the output folder is a local path
or a URI (``s3://bucket/run/teacher``) alike, and only the driver writes to it. Nothing here names a backend: what
one needs and how it runs is its entry in `teacher.backends.BACKENDS`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from functools import partial
from typing import Callable, Iterator

import pyarrow as pa

from qcrd_ray import console, storage
from qcrd_ray.config import Config
from qcrd_ray.data import prompts
from qcrd_ray.data.loaders import load_split
from qcrd_ray.data.schema import examples_table
from qcrd_ray.data.tasks import TaskSpec, get_task
from qcrd_ray.teacher.backends import get_backend
from qcrd_ray.teacher.samples import expand_samples, parse_samples
from qcrd_ray.teacher.shards import Shard, ShardCollector, check_manifest, kept_shards, manifest, plan_shards
from qcrd_ray.teacher.sources import Source, resolve_sources
from qcrd_ray.teacher.summary import summarize

log = logging.getLogger(__name__)

# CPUs of the light per-row step (duplication), so it never starves the teacher pool
LIGHT_NUM_CPUS = 0.25
# what the driver needs from a sample row (the prompt and the recorded rationales stay on the workers)
RESULT_COLUMNS = ["shard", "id", "sample_index", "text", "error", "rationale", "answer", "status"]
# The driver keeps ~10 KB of Ray Data state per input block until the run ends (+14 MiB over the 1,500 blocks of
# 6000 examples, measured), so past this many, blocks get bigger rather than more numerous: flat driver memory,
# and a task then runs a few teacher batches in a row.
MAX_INPUT_BLOCKS = 200


def parse_batch(batch: pa.Table, parse: Callable, task: TaskSpec) -> pa.Table:
    """A backend's text/error batch -> the parsed sample rows the driver needs (RESULT_COLUMNS)."""
    return parse_samples(batch, parse, task).select(RESULT_COLUMNS)


def prompt_fn_for(cfg: Config, task: TaskSpec) -> Callable | None:
    """The few-shot prompt of a sample row, where ``cfg.teacher.backend`` needs one."""
    return partial(prompts.teacher_prompt, task) if get_backend(cfg.teacher.backend).needs_prompt else None


def input_blocks(shards: list[Shard], batch_size: int, k: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) of each input block: examples of one shard, about one teacher batch after K-fold
    duplication (enough blocks to keep every actor busy), fewer and bigger past MAX_INPUT_BLOCKS."""
    examples_per_block = max(1, math.ceil(batch_size / k), math.ceil(sum(s.size for s in shards) / MAX_INPUT_BLOCKS))
    return [(shard.index, start, min(start + examples_per_block, shard.stop))
            for shard in shards for start in range(shard.start, shard.stop, examples_per_block)]


def _expand_blocks(
    batch: pa.Table, examples: list, bounds: list[tuple[int, int, int]], indices: tuple[int, ...], teacher_seed: int,
    prompt_fn, rationales: bool,
) -> pa.Table:
    """The sample rows (sample ``indices`` of each example) of the input blocks numbered in ``batch["item"]``, cut on
    the worker from the split's table (``examples``: its object ref, in a list so Ray passes the ref and does not
    resolve it). ``rationales``: keep the recorded rationales column (only the backend replaying them gets it)."""
    import ray

    table = ray.get(examples[0])
    if not rationales and "rationales" in table.column_names:
        table = table.drop_columns(["rationales"])
    parts = []
    for index in batch.column("item").to_pylist():
        shard, start, stop = bounds[index]
        block = table.slice(start, stop - start)
        block = block.append_column("shard", pa.array([shard] * block.num_rows, pa.int32()))
        parts.append(expand_samples(block, len(indices), teacher_seed, prompt_fn, indices))
    return pa.concat_tables(parts)


def _source_dataset(source: Source, task: TaskSpec, examples_ref, shards: list[Shard]):
    """One source's parsed sample rows of the given shards: its own input blocks and sample rows, then its
    backend's ``build``."""
    import ray

    t = source.cfg.teacher
    bounds = input_blocks(shards, t.batch_size, len(source.indices))
    # ≤ MAX_INPUT_BLOCKS tiny driver-made blocks, not ray.data.range: its read tasks ask for a whole CPU, which a
    # busy cluster may never free once the teacher actors hold theirs (two sweep trials teaching at once hung so)
    ds = ray.data.from_items(list(range(len(bounds))), override_num_blocks=len(bounds))
    ds = ds.map_batches(
        _expand_blocks,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"examples": [examples_ref], "bounds": bounds, "indices": source.indices, "teacher_seed": t.seed,
                   "prompt_fn": prompt_fn_for(source.cfg, task), "rationales": source.backend.needs_rationales},
        num_cpus=LIGHT_NUM_CPUS,
    )
    return source.backend.build(ds, source.cfg, partial(parse_batch, parse=source.backend.parse, task=task))


def build_dataset(cfg: Config, task: TaskSpec, examples: pa.Table | list[dict], shards: list[Shard]):
    """The lazy Ray Data pipeline producing parsed sample rows (RESULT_COLUMNS) of the given shards
    (``examples``: the split, an EXAMPLE_SCHEMA table or its rows): each source's, in one stream."""
    import ray

    sources = resolve_sources(cfg)
    # The split goes to the object store once, as one table; the input blocks are numbers that the workers turn
    # into examples. (One driver-made block per few examples, ray.data.from_arrow, cost the driver ~50 KB each,
    # so its memory grew with the split.)
    table = examples if isinstance(examples, pa.Table) else examples_table(examples)
    if not any(s.backend.needs_rationales for s in sources):
        table = table.drop_columns(["rationales"])
    ref = ray.put(table)
    datasets = [_source_dataset(source, task, ref, shards) for source in sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _generate(cfg: Config, task: TaskSpec, examples: pa.Table, todo: list[Shard], on_shard) -> None:
    from qcrd_ray.ray_utils import init_ray

    init_ray()
    collector = ShardCollector(todo, examples, cfg.teacher.k, task, cfg.self_consistency.positive_rule)
    ds = build_dataset(cfg, task, examples, todo)
    done = examples_done = 0
    started = time.monotonic()
    bar = console.progress("teach", total=sum(s.size for s in todo) * cfg.teacher.k, unit="samples")
    # Closed on any exit: an interrupt in the loop (Ctrl-C, a lost lease) would otherwise leave Ray Data's executor
    # thread running until garbage collection, which can come after ray.shutdown() at exit, and a thread that
    # touches Ray after its shutdown makes the core worker end the process with code 1, not the driver's own.
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    with contextlib.closing(batches):
        for batch in bar.track(batches, lambda b: b.num_rows):
            for shard, table in collector.add(batch):
                storage.write_parquet(shard.path, table)
                done += 1
                examples_done += shard.size
                not_ok = sum(s["status"] != "ok" for row in table.column("samples").to_pylist() for s in row)
                log.info(
                    "shard %d written (%d/%d this run): %d examples, %d samples not ok, %.1f examples/s -> %s",
                    shard.index, done, len(todo), table.num_rows, not_ok,
                    examples_done / max(time.monotonic() - started, 1e-9), storage.basename(shard.path),
                )
                if on_shard is not None:
                    on_shard(shard, table)
    if collector.duplicates:
        log.info("%d samples arrived twice (retried tasks) and were kept once", collector.duplicates)
    if collector.unfinished:
        raise RuntimeError(f"the pipeline ended with shards {collector.unfinished} incomplete")


def iter_teacher_rows(out_dir: storage.Location) -> Iterator[dict]:
    """Every TEACHER_SCHEMA row of a teacher output folder (a path or a URI), in order: a few rows in memory at a
    time."""
    for location in storage.list_files(out_dir, "part-*.parquet"):
        for batch in storage.iter_parquet_batches(location):
            yield from batch.to_pylist()


def error_records(row: dict) -> list[dict]:
    """The errors.jsonl records of one TEACHER_SCHEMA row: each sample that is not ok, with its reason."""
    return [
        {"id": row["id"], "index": s["index"], "status": s["status"],
         "reason": s["error"] or ("no answer in the output" if s["status"] == "no_answer" else "empty output"),
         "text": s["text"][:500]}
        for s in row["samples"] if s["status"] != "ok"
    ]


def _write_errors(rows: Iterator[dict], f) -> Iterator[dict]:
    """Passes ``rows`` through, writing their error records to ``f`` as JSON lines as they go, so the summary and
    errors.jsonl come from one read of the shards and the driver holds one shard, not every error (rebuilt from
    the shards, so a resumed run reports the same as an uninterrupted one)."""
    for row in rows:
        for record in error_records(row):
            f.write(storage.jsonl_line(record))
        yield row


def run_teacher(
    cfg: Config,
    out_dir: storage.Location,
    split: str | None = None,
    *,
    on_shard: Callable[[Shard, pa.Table], None] | None = None,
) -> dict:
    """Generate (or finish generating) the teacher output of one split into ``out_dir`` (a local path or a URI)
    and return the run summary (also written to ``summary.json``). Rerunning on the same folder skips finished
    shards.

    ``on_shard(shard, table)`` is called after each shard is stored (progress reporting, early stopping).
    """
    split = split or cfg.data.train_split
    out = os.fspath(out_dir)
    task = get_task(cfg.data.task, cfg.data.answer_type)
    loaded = load_split(cfg.data, split)
    rejected = storage.write_jsonl_stream(storage.join(out, "rejects.jsonl"), loaded.rejects)
    # the split stays on the driver as one Arrow table: as Python rows it costs ~1 KB an example
    examples = examples_table(loaded.rows)
    del loaded
    ids = examples.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.data.task}/{split}: example ids are not unique; teacher output is keyed by id")
    check_manifest(out, manifest(cfg, split, ids))
    storage.write_text(storage.join(out, "config.yaml"), cfg.to_yaml())
    storage.remove_partial_writes(out)

    shards = plan_shards(examples.num_rows, cfg.teacher.shard_rows, out)
    kept, refetch = kept_shards(shards, set(storage.list_files(out, "part-*.parquet")))
    for shard in refetch:
        log.warning("shard %d (%s) does not hold its %d examples (truncated or unreadable): generating it again",
                    shard.index, storage.basename(shard.path), shard.size)
    done = {s.index for s in kept}
    todo = [s for s in shards if s.index not in done]
    sources = resolve_sources(cfg)
    log.info(
        "teacher %s on %s/%s: %d examples x K=%d in %d shards (%d already done), %d rejected rows",
        " + ".join(f"{s.name} ({len(s.indices)})" if cfg.teacher.sources else s.name for s in sources),
        cfg.data.task, split, examples.num_rows, cfg.teacher.k, len(shards), len(shards) - len(todo), rejected,
    )
    if todo:
        _generate(cfg, task, examples, todo, on_shard)
    del examples, ids

    with storage.open_write(storage.join(out, "errors.jsonl")) as errors:
        # per-source statistics only where teacher.sources names the sources
        by_source = (sources, task) if cfg.teacher.sources else None
        stats = summarize(_write_errors(iter_teacher_rows(out), errors), by_source)
    summary = {
        "task": cfg.data.task,
        "split": split,
        "backend": ", ".join(dict.fromkeys(s.backend.name for s in sources)),
        "k": cfg.teacher.k,
        "positive_rule": cfg.self_consistency.positive_rule,
        "shards": len(shards),
        "rejected_rows": rejected,
        **stats,
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


__all__ = ["run_teacher", "build_dataset", "iter_teacher_rows"]
