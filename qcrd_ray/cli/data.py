"""``qcrd data inspect``: load one split and show its rows, rejected rows with reasons and label distribution."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from qcrd_ray.cli import add_config_arguments, load_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    inspect = sub.add_parser(
        "inspect",
        help="load a split and print rows, rejects (with reasons) and the label distribution",
        description="Load one split the way the pipeline does and report what was read and what was rejected. "
        "Without --data (and no data.data_dir in the config) it inspects the built-in synthetic task.",
    )
    inspect.add_argument("--data", help="dataset folder (DSS layout <data>/<task>/<task>_<split>.json) or a "
                         "JSONL/Parquet file or folder for a user task (sets data.data_dir)")
    inspect.add_argument("--task", help="task name: synthetic, svamp, cqa, anli1, esnli or a user task (sets data.task)")
    inspect.add_argument("--split", default="train", choices=("train", "valid", "test"), help="split (default: train)")
    inspect.add_argument("--limit", type=int, default=3, help="example rows and rejects to show (default: 3)")
    inspect.add_argument("--rejects", metavar="PATH", help="also write every rejected row to PATH as JSON Lines")
    inspect.add_argument("--json", action="store_true",
                         help="print one JSON object: task, split, rows (count), rejects (count), rejects_by_kind, "
                         "label_distribution, summary, examples and rejected (the first --limit of each)")
    add_config_arguments(inspect)


def run(args: argparse.Namespace) -> int:
    from qcrd_ray.data.loaders import DataError, load_split
    from qcrd_ray.data.prompts import parse_recorded_cot
    from qcrd_ray.data.tasks import get_task

    cfg = load_config_from_args(args, data="data.data_dir", task="data.task").data
    try:
        result = load_split(cfg, args.split, rejects_path=args.rejects)
    except (DataError, OSError) as e:
        print(f"qcrd data inspect: {e}", file=sys.stderr)
        return 1
    summary, spec = result.summary, get_task(cfg.task, cfg.answer_type)
    if args.json:
        print(json.dumps({
            "task": result.task,
            "split": result.split,
            "rows": summary["rows"],
            "rejects": summary["rejected"],
            "rejects_by_kind": summary["rejects_by_kind"],
            "label_distribution": summary["label_distribution"],
            "summary": summary,
            "examples": result.rows[: args.limit],
            "rejected": result.rejects[: args.limit],
        }, ensure_ascii=False, indent=2))
        return 0
    print(f"{result.task} / {result.split}: {summary['rows']} rows, {summary['rejected']} rejected, "
          f"{summary['with_rationale']} with a recorded rationale")
    print(f"source: {summary['source']}" + ("  (valid carved from train)" if summary["valid_carved_from_train"] else ""))
    print("\nlabel distribution:")
    total = max(1, summary["rows"])
    for label, count in summary["label_distribution"].items():
        print(f"  {label:<30} {count:>7}  {100 * count / total:5.1f}%")
    if result.rows[: args.limit]:
        print(f"\nfirst {min(args.limit, len(result.rows))} rows:")
    for row in result.rows[: args.limit]:
        print(f"- id: {row['id']}\n  label: {row['label']}")
        print("  input: " + textwrap.shorten(row["input"], 300))
        for recorded in row["rationales"][:1]:
            parsed = parse_recorded_cot(spec, recorded, row["choices"])
            print(f"  recorded rationale ({parsed.status}, answer {parsed.answer!r}): "
                  + textwrap.shorten(parsed.rationale, 200))
    if result.rejects:
        print("\nrejected rows by kind: " + ", ".join(f"{k} {n}" for k, n in summary["rejects_by_kind"].items()))
        for reject in result.rejects[: args.limit]:
            where = f"line {reject['line']}" if "line" in reject else f"index {reject.get('index', '-')}"
            print(f"- {reject['source']} {where}: {reject['reason']}")
        if args.rejects:
            print(f"all {len(result.rejects)} rejected rows written to {args.rejects}")
    return 0
