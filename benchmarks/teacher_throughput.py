"""Teacher pipeline throughput: the hf backend in the Ray Data pipeline (1 and 2 actors) against the same
backend in a plain Python loop with the same batch size. Both are timed from nothing (model load included)
to every sample row generated and parsed.

    python benchmarks/teacher_throughput.py [--examples 48 --k 4 --batch-size 16 --max-tokens 32]

Targets on a 2-core machine: pipeline overhead at 1 actor <= 10 %, 2 actors >= 1.5x the plain loop. Starts its
own local Ray and shuts it down; record results in docs/benchmarks.md ("Teacher generation").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from qcrd_ray.config import Config, StudentConfig  # noqa: E402
from qcrd_ray.data.loaders import load_split  # noqa: E402
from qcrd_ray.data.schema import examples_table  # noqa: E402
from qcrd_ray.data.tasks import get_task  # noqa: E402
from qcrd_ray.students import load_student, save_student  # noqa: E402
from qcrd_ray.teacher import pipeline  # noqa: E402
from qcrd_ray.teacher.backends import get_backend  # noqa: E402
from qcrd_ray.teacher.samples import expand_samples  # noqa: E402
from qcrd_ray.teacher.shards import plan_shards  # noqa: E402


def build_model(path: Path, examples: list[dict], d_model: int) -> None:
    torch.manual_seed(0)
    cfg = StudentConfig(tiny_d_model=d_model, tiny_d_ff=2 * d_model, tiny_layers=2, tiny_heads=4, tiny_vocab_size=400)
    model, tok = load_student(cfg, [e["input"] for e in examples])
    save_student(model, tok, path)


class Timing:
    """End-to-end rate (from nothing, model load included) and steady-state rate (after the first batch is out,
    so actor start-up and model load are excluded on both sides)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = self.first_rows = None
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows
        if self.first is None:
            self.first, self.first_rows = time.perf_counter(), rows

    def done(self) -> tuple[float, float]:
        end = time.perf_counter()
        return self.rows / (end - self.start), (self.rows - self.first_rows) / max(end - self.first, 1e-9)


def plain_loop(cfg: Config, examples: list[dict], threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    task = get_task(cfg.data.task)
    timing = Timing()
    backend = get_backend(cfg.teacher.backend)  # the very backend + parse the pool actors run
    worker = backend.build.worker(cfg, partial(pipeline.parse_batch, parse=backend.parse, task=task))
    table = examples_table(examples)
    table = table.append_column("shard", pa.array([0] * table.num_rows, pa.int32()))
    rows = expand_samples(table, cfg.teacher.k, cfg.teacher.seed, pipeline.prompt_fn_for(cfg, task))
    for offset in range(0, rows.num_rows, cfg.teacher.batch_size):
        timing.add(worker(rows.slice(offset, cfg.teacher.batch_size)).num_rows)
    return timing.done()


def ray_pipeline(cfg: Config, examples: list[dict], actors: int) -> tuple[float, float]:
    cfg = cfg.replace(teacher={"min_actors": actors, "max_actors": actors})
    shards = plan_shards(len(examples), len(examples), Path(tempfile.gettempdir()))
    timing = Timing()
    ds = pipeline.build_dataset(cfg, get_task(cfg.data.task), examples, shards)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        timing.add(batch.num_rows)
    return timing.done()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=128, help="width of the tiny T5 teacher")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each configuration")
    args = ap.parse_args()

    import ray

    base = Config().replace(data={"synthetic_train_size": args.examples})
    examples = load_split(base.data, "train").rows
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp) / "teacher", examples, args.d_model)
        cfg = base.replace(teacher={"backend": "hf", "model": str(Path(tmp) / "teacher"), "k": args.k,
                                    "batch_size": args.batch_size, "max_tokens": args.max_tokens, "num_cpus": 0.5})
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            ray_pipeline(cfg, examples[:4], 1)  # warm-up: Ray worker processes, imports
            default_threads = torch.get_num_threads()
            results = {}
            for name, fn in [
                (f"plain loop ({default_threads} torch threads)", lambda: plain_loop(cfg, examples, default_threads)),
                ("plain loop (1 torch thread)", lambda: plain_loop(cfg, examples, 1)),
                ("pipeline, 1 actor (1 thread)", lambda: ray_pipeline(cfg, examples, 1)),
                ("pipeline, 2 actors (1 thread each)", lambda: ray_pipeline(cfg, examples, 2)),
            ]:
                runs = [fn() for _ in range(args.repeats)]
                results[name] = tuple(max(r[i] for r in runs) for i in range(2))
            torch.set_num_threads(default_threads)
        finally:
            ray.shutdown()

    print(f"\n{args.examples} examples x K={args.k} = {args.examples * args.k} rows, batch {args.batch_size}, "
          f"{args.max_tokens} new tokens, tiny T5 d_model={args.d_model}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    # the baseline is the faster plain loop (Ray gives each fractional-CPU actor 1 torch thread)
    plain = [name for name in results if name.startswith("plain")]
    for i, kind in enumerate(("end to end (model load included)", "steady state (after the first batch)")):
        baseline = max(results[name][i] for name in plain)
        print(f"\n{kind:<38} {'rows/s':>8} {'vs best plain':>14}")
        for name, rates in results.items():
            print(f"{name:<38} {rates[i]:>8.1f} {rates[i] / baseline:>13.2f}x")
        one, two = results["pipeline, 1 actor (1 thread)"][i], results["pipeline, 2 actors (1 thread each)"][i]
        print(f"overhead at 1 actor: {1 - one / baseline:+.1%} (target <= 10 %); "
              f"2 actors: {two / baseline:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
