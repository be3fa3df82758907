"""``qcrd teach``: sample K teacher rationales per question on Ray Data, split them by self-consistency and write
Parquet shards, a summary and the resolved config to ``--out``. Rerun the same command to resume."""

from __future__ import annotations

import argparse
import logging
import sys

from qcrd_ray.cli import add_config_arguments, add_force_argument, load_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", metavar="DIR", help="dataset folder (DSS layout) or file; sets data.data_dir")
    parser.add_argument("--task", help="task name (synthetic, svamp, cqa, anli1, esnli or a user task); sets data.task")
    parser.add_argument("--split", help="split to generate for (default: data.train_split)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: part-*.parquet, summary.json, errors.jsonl, rejects.jsonl, config.yaml")
    add_force_argument(parser)
    parser.epilog = (
        "Backends (teacher.backend): synthetic (rule-based, no model), recorded (the dataset's llm/ rationales, "
        "teacher.k=1), hf (teacher.model = local HF path), http (OpenAI-compatible teacher.base_url, key in "
        "$OPENAI_API_KEY or teacher.api_key_env), vllm (GPU, the gpu extra). Example: qcrd teach --data "
        "../shared/data --task svamp --out runs/svamp/teacher --set teacher.backend=recorded --set teacher.k=1"
    )


def run(args: argparse.Namespace) -> int:
    from qcrd_ray import lease
    from qcrd_ray.data.loaders import DataError
    from qcrd_ray.teacher.pipeline import run_teacher
    from qcrd_ray.teacher.summary import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qcrd_ray.teacher.sources import check_teacher

    cfg = load_config_from_args(args, data="data.data_dir", task="data.task")
    check_teacher(cfg)  # every teacher source, before Ray or any data is touched
    try:
        with lease.held(args.out, "qcrd teach", force=args.force):
            summary = run_teacher(cfg, args.out, split=args.split)
    except DataError as e:
        print(f"qcrd teach: data error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"teacher output in {args.out} (summary.json, errors.jsonl, rejects.jsonl)")
    return 0
