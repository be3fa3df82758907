"""A Serve replica SIGKILLed under load (its PID from Ray's state API, not ``ray.kill``): how many requests fail,
for how long, and how soon the deployment is whole again.

    python benchmarks/serve_faults.py                    # trains a tiny synthetic student first (~20 s)
    python benchmarks/serve_faults.py --clients 8 --seconds 40 --model runs/demo

Two replicas (autoscaling pinned), ``--clients`` closed-loop clients of ``POST /v1/predict``; after ``--warmup-s``
one replica's process is killed. Printed: requests sent and failed (non-200 or no answer), the window in which
failures happened, and the time until Ray reports two live replicas again. Starts its own local Ray and shuts it down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from qcrd_ray.testing import free_port, train_tiny_student

QUESTION = "Tom has 5.0 apples and buys 3.0 more. How many apples does Tom have now?"


def replica_actors() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
            if (a.name or "").startswith("SERVE_REPLICA::") and a.pid]


def client(url: str, stop: threading.Event, log: list, lock: threading.Lock) -> None:
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = http.post(f"{url}/v1/predict", json={"task": "synthetic", "input": QUESTION}).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            with lock:
                log.append((sent, time.monotonic(), status))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run or HF model directory (default: train a tiny synthetic student)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=40.0, help="load duration, the kill included")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="load before the kill")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import ray
    from ray import serve

    from qcrd_ray.config import Config
    from serve.app import build

    workdir = Path(tempfile.mkdtemp(prefix="qcrd-serve-faults-"))
    model = args.model
    if model is None:
        model = str(workdir / "model")
        train_tiny_student(model)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True)  # the state API finds the replica PIDs
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = Config().replace(serve={"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5, "max_new_tokens": 24})
    serve.run(build(model, cfg, name="faults"), name="faults", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    log: list = []
    lock, stop = threading.Lock(), threading.Event()
    threads = [threading.Thread(target=client, args=(url, stop, log, lock), daemon=True) for _ in range(args.clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(args.warmup_s)
    victim = replica_actors()[0]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    whole_at = None
    while time.monotonic() - started < args.seconds:
        if whole_at is None:
            alive = [a for a in replica_actors() if a.pid != victim.pid]
            if len(alive) >= 2:
                whole_at = time.monotonic()
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=90)

    failed = [entry for entry in log if entry[2] != 200]
    result = {
        "clients": args.clients, "requests": len(log), "failed": len(failed),
        "failed_kinds": sorted({str(f[2]) for f in failed}),
        "failure_window_s": round(max(f[1] for f in failed) - min(f[0] for f in failed), 2) if failed else 0.0,
        "replicas_whole_after_s": round(whole_at - killed_at, 1) if whole_at else None,
        "requests_per_s": round(len(log) / (time.monotonic() - started), 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
