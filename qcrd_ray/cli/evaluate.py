"""``qcrd eval``: accuracy of a trained student on one split, in predict or explain mode."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qcrd_ray.cli import add_config_arguments, load_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_OR_HF_DIR",
                        help="a run directory (its RUN/model is used) or a Hugging Face model directory")
    parser.add_argument("--data", metavar="DIR", help="dataset folder (DSS layout) or file; sets data.data_dir "
                        "(default: the config's, else the built-in synthetic task)")
    parser.add_argument("--task", help="task name (svamp, cqa, anli1, esnli, synthetic, or a user task); sets data.task")
    parser.add_argument("--split", help="split to score (default: data.eval_split, i.e. test)")
    parser.add_argument("--mode", choices=("predict", "explain"), default="predict",
                        help="predict: decode the label directly (default); explain: write a rationale and parse "
                             "its answer")
    parser.add_argument("--out", metavar="DIR", help="where predictions.jsonl and metrics.json go (default: "
                        "RUN/eval/<split>-<mode> for a run directory, else nothing is written)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_config_arguments(parser)


def _is_run_dir(path: Path) -> bool:
    return (path / "model" / "config.json").is_file()


def run(args: argparse.Namespace) -> int:
    from qcrd_ray.evaluate import evaluate

    model = Path(args.model)
    config = args.config
    if config is None and _is_run_dir(model) and (model / "train" / "config.yaml").is_file():
        config = model / "train" / "config.yaml"  # the run's own student settings (input/target lengths, dtype)
    cfg = load_config_from_args(args, config, data="data.data_dir", task="data.task")
    split = args.split or cfg.data.eval_split
    out = args.out or (model / "eval" / f"{split}-{args.mode}" if _is_run_dir(model) else None)
    try:
        metrics = evaluate(model, cfg, split, mode=args.mode, out_dir=out)
    except (FileNotFoundError, ValueError) as e:  # no model there, an unknown split, an empty split
        print(f"qcrd eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{metrics['task']} {split} ({args.mode}): accuracy {metrics['accuracy']:.4f} "
              f"({metrics['correct']}/{metrics['n']}, {metrics['unparsed']} unparsed)"
              + (f"; predictions in {out}" if out else ""))
    return 0
