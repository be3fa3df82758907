"""``qcrd run``: the whole pipeline on a local Ray (or the cluster in RAY_ADDRESS / --address)."""

from __future__ import annotations

import argparse
import logging
import sys

from qcrd_ray.cli import add_config_arguments, add_force_argument, load_config_from_args
from qcrd_ray.methods import METHODS


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
    parser.add_argument("--out", help="run location: a directory, or a URI every node reaches (s3://bucket/run, "
                        "gs://...); default runs/<task>")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    add_force_argument(parser)


def run(args: argparse.Namespace) -> int:
    from qcrd_ray import lease
    from qcrd_ray.pipeline import check_runnable, comparison_table
    from qcrd_ray.runs import RunLayout

    cfg = load_config_from_args(args, data="data.data_dir", task="data.task")
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else (cfg.train.method,)
    check_runnable(cfg, methods)  # refused here, before a run directory or Ray exists
    layout = RunLayout.at(args.out or f"runs/{cfg.data.task}")

    # held before anything of the run is touched (its logs included), until the command ends
    with lease.held(layout.root, "qcrd run", force=args.force) as run_lease:
        result = _run(args, cfg, methods, layout, run_lease)
    if result is None:
        return 1
    print()
    print(comparison_table(result["methods"]))
    print(f"\nreport: {result['report']}")
    print(f"serve it: qcrd serve --model {layout.method(methods[-1]).root}")
    sys.stdout.flush()
    return 0


def _run(args, cfg, methods, layout, run_lease) -> dict | None:
    """The pipeline with its logs in RUN/logs; None (after one line on stderr) when a stage failed."""
    import ray

    from qcrd_ray import console
    from qcrd_ray.config import ConfigError
    from qcrd_ray.pipeline import run_pipeline

    # RUN/logs/qcrd.log (DEBUG, tracebacks) and workers.log; on a URI written locally, uploaded when the run ends
    log_file, upload_logs = console.log_to_storage(layout.logs)
    connected_before = ray.is_initialized()
    try:
        result = run_pipeline(cfg, layout.root, methods, address=args.address)
    except ConfigError:
        raise
    except Exception as e:
        if run_lease.lost:  # the heartbeat cut the run short: lease.held says why, in one line
            raise
        # The traceback goes to the log file only; the console gets one line saying what failed and where to look.
        log_file.handle(logging.getLogger(__name__).makeRecord(
            __name__, logging.ERROR, __file__, 0, "qcrd run failed", (), (type(e), e, e.__traceback__)))
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qcrd run failed: {what} (full log: {layout.log_file})", file=sys.stderr)
        return None
    finally:
        if not connected_before:
            ray.shutdown()  # flushes the workers' log lines now, so they do not land in the middle of the summary
        try:
            if not run_lease.lost:  # the logs of a run taken over are its new holder's
                upload_logs()
        except Exception as e:  # noqa: BLE001 - a failed log upload must not hide the run's own outcome
            print(f"qcrd run: could not store the logs at {layout.logs}: {e}", file=sys.stderr)
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    return result
