"""``qcrd report``: rebuild RUN/report.md and RUN/figures from a run's outputs (a directory or a URI)."""

from __future__ import annotations

import argparse
import sys

from qcrd_ray.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="RUN",
                        help="the run: the --out of a `qcrd run`, a directory or a URI (s3://bucket/run)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from qcrd_ray.report import rebuild_report

    if args.config or args.overrides:
        print("qcrd report: the report uses the run's own config (RUN/config.yaml); drop --config/--set",
              file=sys.stderr)
        return 2
    try:
        report = rebuild_report(args.out)
    except FileNotFoundError as e:
        print(f"qcrd report: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0
