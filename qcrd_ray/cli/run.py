"""``qcrd run``: the whole pipeline on a local Ray (or the cluster in RAY_ADDRESS / --address)."""

from __future__ import annotations

import argparse
import logging
import sys

from qcrd_ray.cli import add_config_arguments, load_config_from_args

METHODS = ("finetune", "dss", "qcrd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Teach -> train -> evaluate -> report. With no arguments: the built-in synthetic task, the synthetic "
        "teacher and a tiny T5 trained with QCRD on 2 local workers (a few minutes on a laptop). Rerunning the "
        "same command continues an interrupted run."
    )
    add_config_arguments(parser)
    parser.add_argument("--data", help="dataset folder in the DSS layout, or a JSONL/Parquet file (data.data_dir)")
    parser.add_argument("--task", help="task name: svamp, cqa, anli1, esnli, synthetic, or a user task (data.task)")
    parser.add_argument("--methods", help="comma-separated methods trained at the same budget and seed, "
                        f"compared in one table (any of {', '.join(METHODS)}; default: train.method)")
    parser.add_argument("--out", help="run directory (default: runs/<task>)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    from qcrd_ray.config import ConfigError
    from qcrd_ray.pipeline import comparison_table, run_pipeline

    cfg = load_config_from_args(args, data="data.data_dir", task="data.task")
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else (cfg.train.method,)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    out = args.out or f"runs/{cfg.data.task}"

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import ray

    connected_before = ray.is_initialized()
    result = run_pipeline(cfg, out, methods, address=args.address)
    if not connected_before:
        ray.shutdown()  # flushes the workers' log lines now, so they do not land in the middle of the summary

    print()
    print(comparison_table(result["methods"]))
    print(f"\nreport: {result['report']}")
    best = methods[-1]
    print(f"serve it: qcrd serve --model {out}/{best}")
    sys.stdout.flush()
    return 0
