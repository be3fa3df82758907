"""``qcrd eval``: accuracy of a trained student on one split, in predict or explain mode."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from qcrd_ray.cli import add_config_arguments, add_force_argument, load_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_OR_DIR",
                        help="a method of a run (RUN/<method>, as `qcrd run` prints), a run (its train.method), or a "
                        "Hugging Face model directory; each a path or a URI (s3://bucket/run/qcrd)")
    parser.add_argument("--data", metavar="DIR", help="dataset folder (DSS layout) or file; sets data.data_dir "
                        "(default: the config's, else the built-in synthetic task)")
    parser.add_argument("--task", help="task name (svamp, cqa, anli1, esnli, synthetic, or a user task); sets data.task")
    parser.add_argument("--split", help="split to score (default: the config's data.eval_split: test, "
                        "unless the config sets another, as a sweep trial's sets valid)")
    parser.add_argument("--mode", choices=("predict", "explain"), default="predict",
                        help="predict: decode the label directly (default); explain: write a rationale and parse "
                             "its answer")
    parser.add_argument("--out", metavar="DIR", help="where predictions.jsonl and metrics.json go, a path or a URI (default: "
                        "RUN/<method>/eval/<split>-<mode> for a run, else nothing is written)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_force_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from qcrd_ray import lease
    from qcrd_ray.evaluate import evaluate
    from qcrd_ray.runs import resolve_model

    try:
        resolved = resolve_model(args.model)
    except FileNotFoundError as e:
        print(f"qcrd eval: {e}", file=sys.stderr)
        return 2
    # the model's own config (task, input/target lengths, dtype) unless --config names another
    base = resolved.config if args.config is None else None
    cfg = load_config_from_args(args, base, data="data.data_dir", task="data.task")
    split = args.split or cfg.data.eval_split
    out = args.out or (resolved.method.eval(split, args.mode) if resolved.method is not None else None)
    # the folder it writes is held (nothing is written without --out to a bare model directory)
    holding = lease.held(out, "qcrd eval", force=args.force) if out else contextlib.nullcontext()
    try:
        with holding:
            metrics = evaluate(resolved.model_dir, cfg, split, mode=args.mode, out_dir=out)
    except (FileNotFoundError, ValueError) as e:  # an unknown split, an empty split
        print(f"qcrd eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{metrics['task']} {split} ({args.mode}): accuracy {metrics['accuracy']:.4f} "
              f"({metrics['correct']}/{metrics['n']}, {metrics['unparsed']} unparsed)"
              + (f"; predictions in {out}" if out else ""))
    return 0
