"""Training on S3 vs a local path: what storing the run on an object store costs a round.

``run_training`` (qcrd, the embedded tiny student, synthetic teacher rows) twice on the same teacher output: once
with RUN a local directory, once with RUN ``s3://…`` on a real S3-compatible server on loopback (moto's
``ThreadedMotoServer``, the test suite's ``s3_server``). Per round, from the round-end lines of metrics.jsonl:

- ``round_s``: the step loop of the round (no storage on it);
- ``wall_s``: one round-end line to the next, so the round's steps plus what blocks at the previous round end:
  metrics sync, the checkpoint (Ray Train uploads it before ``report`` returns), the snapshot publish (rank 0
  blocks on the call only; the store writes the snapshot) and the negatives' collection and D refresh;
- ``end_s`` = ``wall_s - round_s``: the round-end block.

Target: S3 wall time per round <= 1.1x the local one. Starts its own local Ray (2 CPUs) and S3 server.

    python benchmarks/train_storage.py                       # 5 rounds x 20 steps, 128 examples
    python benchmarks/train_storage.py --rounds 3 --round-steps 5 --examples 64   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from qcrd_ray.testing import free_port

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



def start_s3() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, its AWS_* environment set before Ray starts (workers inherit it)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.client("s3").create_bucket(Bucket="qcrd-bench")
    return server, "s3://qcrd-bench"


def config(args):
    from qcrd_ray.config import from_dict

    return from_dict({
        "data": {"task": "synthetic", "synthetic_train_size": args.examples, "synthetic_eval_size": 8},
        "teacher": {"backend": "synthetic", "k": 5, "min_actors": 1, "max_actors": 1},
        "discriminator": {"pretrain_steps": 10, "refresh_steps": 5},
        "snapshots": {"j": 1, "max_new_tokens": 24, "sampler_num_cpus": 0.5},
        "train": {"num_workers": 2, "num_cpus_per_worker": 0.5, "batch_size": 8, "rounds": args.rounds,
                  "round_steps": args.round_steps, "log_every": max(1, args.round_steps // 2)},
    })


def per_round(metrics_location: str) -> list[dict]:
    from qcrd_ray.console import read_metrics

    rounds = [m for m in read_metrics(metrics_location) if "completed_rounds" in m]
    return [{"round": b["completed_rounds"], "round_s": b["round_s"], "wall_s": b["time"] - a["time"],
             "end_s": b["time"] - a["time"] - b["round_s"]} for a, b in zip(rounds, rounds[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-steps", type=int, default=20)
    args = parser.parse_args()

    server, bucket = start_s3()
    import ray

    from qcrd_ray.ray_utils import worker_runtime_env
    from qcrd_ray.runs import MethodLayout
    from qcrd_ray.teacher.pipeline import run_teacher
    from qcrd_ray.train import checkpoint as ckpt
    from qcrd_ray.train.trainer import run_training

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=worker_runtime_env())  # as every qcrd command: see ray_utils.pin_ray_address
    cfg = config(args)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            teacher = Path(tmp, "teacher")
            run_teacher(cfg, teacher)
            for name, run in (("local path", str(Path(tmp, "run"))), ("s3 (moto, loopback)", f"{bucket}/run")):
                t0 = time.perf_counter()
                run_training(cfg, teacher, run)
                rounds = per_round(MethodLayout.at(run).metrics)
                size = _checkpoint_bytes(ckpt.latest(MethodLayout.at(run).checkpoints))
                results[name] = {"total_s": time.perf_counter() - t0, "rounds": rounds, "checkpoint_mb": size / 1e6}
    finally:
        ray.shutdown()
        server.stop()

    print(f"run_training qcrd, {args.examples} rows, 2 workers x 0.5 CPU, {args.rounds} rounds x "
          f"{args.round_steps} steps; per round after the first (medians)")
    print(f"{'storage':<22} {'total s':>8} {'round_s':>8} {'wall_s':>8} {'end_s':>7} {'ckpt MB':>8}")
    med = {}
    for name, r in results.items():
        m = {k: statistics.median(x[k] for x in r["rounds"]) for k in ("round_s", "wall_s", "end_s")}
        med[name] = m
        print(f"{name:<22} {r['total_s']:>8.1f} {m['round_s']:>8.2f} {m['wall_s']:>8.2f} {m['end_s']:>7.2f} "
              f"{r['checkpoint_mb']:>8.1f}")
        print("  per round (round, wall_s, end_s):",
              [(x["round"], round(x["wall_s"], 2), round(x["end_s"], 2)) for x in r["rounds"]])
    local, s3 = med["local path"], med["s3 (moto, loopback)"]
    ratio = s3["wall_s"] / local["wall_s"]
    print(f"S3 / local wall time per round: {ratio:.2f}x (round-end block {s3['end_s']:.2f} s vs "
          f"{local['end_s']:.2f} s); target <= 1.1x -> {'met' if ratio <= 1.1 else 'MISSED'}")
    print(json.dumps({"ratio": ratio, **{k: v for k, v in med.items()}}))


def _checkpoint_bytes(location: str) -> int:
    from qcrd_ray import storage

    return sum(storage.read_json(storage.join(location, storage.COMPLETE_MARKER))["files"].values())


if __name__ == "__main__":
    main()
