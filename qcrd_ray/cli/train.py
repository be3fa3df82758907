"""``qcrd train``: train the student with Ray Train; rerunning on the same run directory resumes it."""

from __future__ import annotations

import argparse
import json

from qcrd_ray.cli import add_config_arguments, add_force_argument, load_config_from_args
from qcrd_ray.methods import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="TEACHER_OUT",
                        help="folder of teacher shards (the output of `qcrd teach`, e.g. RUN/teacher; a path or a URI)")
    parser.add_argument("--out", required=True, metavar="RUN",
                        help="run location, a directory or a URI (s3://bucket/run): checkpoints and metrics go to "
                             "RUN/train, the final student to RUN/model; an existing run resumes from its last "
                             "checkpoint")
    parser.add_argument("--method", choices=METHODS,
                        help="training method (default: train.method of the config)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    add_force_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from qcrd_ray import lease
    from qcrd_ray.ray_utils import init_ray
    from qcrd_ray.train.trainer import run_training

    cfg = load_config_from_args(args, method="train.method")
    with lease.held(args.out, "qcrd train", force=args.force):
        init_ray(args.address)
        summary = run_training(cfg, args.teacher, args.out)
    print(json.dumps(summary, indent=2))
    return 0
