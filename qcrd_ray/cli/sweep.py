"""``qcrd sweep``: a sweep file's trials on Ray Tune (``qcrd_ray.sweep``); rerun the same command to continue."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="sweep file (e.g. sweeps/quality.yaml)")
    parser.add_argument("--out", required=True, help="sweep directory (a path; a shared mount on a cluster)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD[.SECTION.KEY]=VALUE",
        help="override the sweep file, e.g. --set grid.teacher.noise=[0.3] --set base.train.rounds=4 "
             "--set max_concurrent_trials=2 (repeatable; give the same ones to continue the sweep)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument(
        "--rescore-valid", type=int, metavar="N",
        help="run no trials: score the sweep's finished trials again (predict) on N fresh valid problems of the "
             "synthetic task (at least 2 x eval size + train size, so none was trained on) and write "
             "rescored-valid-N.md: paired tables with less eval noise than the testbed's 150-problem splits, then "
             "the verdicts of the sweep file's pre-registered decision rule when it names one (sweeps/*_v2.yaml)")
    parser.add_argument(
        "--ledger", metavar="FILE",
        help="a JSON-lines record of finished trials that outlives the sweep directory (a path or an s3:// URI; "
             "e.g. a file committed beside the study's docs): trials recorded there under the same config are "
             "taken from it instead of trained, and every finished trial (and --rescore-valid's score) is added to "
             "it, so the sweep continues on a new cluster or checkout, and sweeps sharing arms train them once")
    parser.add_argument("--verbose", "-v", action="store_true", help="also print Ray's and the workers' output")


def run(args: argparse.Namespace) -> int:
    import os

    from qcrd_ray import console
    from qcrd_ray.sweep.spec import load_sweep, trial_count

    spec = load_sweep(args.config, args.overrides)  # refused here, before Ray starts
    if args.rescore_valid is not None:
        from qcrd_ray.sweep.rescore import rescore_valid

        rows = rescore_valid(spec, os.path.abspath(args.out), args.rescore_valid, args.ledger)
        name = f"rescored-valid-{args.rescore_valid}.md"
        print(open(os.path.join(args.out, name)).read())
        print(f"{len(rows)} trials rescored; {name} in {args.out}")
        return 0
    log_file = console.log_to_file(os.path.join(os.path.abspath(args.out), "logs"))
    print(f"sweep {spec.name}: {trial_count(spec)} trials → {args.out}")
    try:
        from qcrd_ray.sweep.tune import run_sweep

        rows = run_sweep(spec, args.out, address=args.address, ledger_at=args.ledger)
    except RuntimeError as e:
        print(f"qcrd sweep: {e}", file=sys.stderr)
        return 1
    finally:
        import logging

        logging.getLogger().removeHandler(log_file)
        log_file.close()
    print(open(os.path.join(args.out, "summary.md")).read())
    print(f"{len(rows)} trials; tables, best.yaml and accuracy.png in {args.out}")
    return 0
