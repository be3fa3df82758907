"""Load test of the Serve application: requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients, with
dynamic batching (serve.max_batch_size) and without it (max_batch_size=1), in the same run on the same replica
settings (both deployed side by side, runs alternating), then the ratios.

    python benchmarks/serve_load.py                      # trains a tiny synthetic student first (~20 s)
    python benchmarks/serve_load.py --shape small --max-new-tokens 16   # T5-small-shaped, random weights
    python benchmarks/serve_load.py --model runs/demo    # a run directory or an HF model directory

Each client is a closed loop (send, wait for the answer, send the next) of ``POST /v1/predict`` with one
synthetic test question at temperature 0. One replica (autoscaling pinned) so the comparison isolates batching.
Starts its own local Ray and shuts it down.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from qcrd_ray.config import ServeConfig
from qcrd_ray.testing import train_tiny_student
from qcrd_ray.testing import free_port

TARGET_SPEEDUP = 3.0  # batched req/s over unbatched at 16 clients
TARGET_TAIL = 2.0  # p99 / p50
TARGET_LONE = 1.25  # batched p50 / unbatched p50 at 1 client: what the batch window costs a lone client
# Realistically sized students without a hub: t5-small's and t5-base's dimensions in the tiny student's
# architecture (student.tiny_t5: gated-GELU feed-forward as T5 v1.1), random weights, T5's 32k vocabulary.
SHAPES = {
    "small": dict(d_model=512, d_ff=2048, layers=6, heads=8),
    "base": dict(d_model=768, d_ff=3072, layers=12, heads=12),
}
T5_VOCAB_SIZE = 32128


def random_student(path: Path, shape: str) -> None:
    """A T5 of ``SHAPES[shape]`` with random weights and the tiny student's Unigram tokenizer (trained on the
    synthetic task's text), saved as an HF model directory. The embeddings and LM head are resized to T5's 32k
    vocabulary so each decoding step costs what a real checkpoint's does; ids the small tokenizer lacks decode to
    nothing. Random weights (seed 0) did not emit ``</s>`` for any of 16 synthetic questions, so generations run to
    ``max_new_tokens``."""
    import torch

    from qcrd_ray import students as student
    from qcrd_ray.config import Config
    from qcrd_ray.data import synthetic

    dims = SHAPES[shape]
    cfg = Config().replace(student={"tiny_d_model": dims["d_model"], "tiny_d_ff": dims["d_ff"],
                                    "tiny_layers": dims["layers"], "tiny_heads": dims["heads"]}).student
    torch.manual_seed(0)
    rows = synthetic.make_split("train", train_size=400, eval_size=50, seed=0)
    model, tok = student.load_student(cfg, [r["input"] for r in rows] + [r["label"] for r in rows])
    model.resize_token_embeddings(T5_VOCAB_SIZE, mean_resizing=False)
    student.save_student(model, tok, path)
    print(f"{shape}: {model.num_parameters() / 1e6:.1f} M parameters (random weights)", flush=True)


async def _client(url: str, bodies: list[dict], latencies: list[float], errors: list[str]) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        for body in bodies:
            start = time.perf_counter()
            resp = await http.post(url, json=body)
            if resp.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(f"{resp.status_code}: {resp.text[:200]}")


async def _load(url: str, questions: list[str], clients: int, per_client: int, max_new_tokens: int,
                explain: bool) -> dict:
    """``clients`` closed-loop clients, ``per_client`` requests each: the rate and every latency (s)."""
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(
        _client(url, [{"task": "synthetic", "input": questions[(c * per_client + i) % len(questions)],
                       "max_new_tokens": max_new_tokens, "explain": explain} for i in range(per_client)],
                latencies, errors)
        for c in range(clients)
    ))
    return {"rps": len(latencies) / (time.perf_counter() - start), "latencies": latencies, "errors": errors}


def summarize(clients: int, runs: list[dict]) -> dict:
    """Repeats of one (mode, clients) cell → median req/s and p50/p99 over all their latencies."""
    lat = np.array([x for r in runs for x in r["latencies"]]) * 1000
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": sum(len(r["errors"]) for r in runs),
        "rps": float(np.median([r["rps"] for r in runs])),
        "rps_runs": [round(r["rps"], 2) for r in runs],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def batch_sizes(base: str, mode: str) -> collections.Counter:
    """The replica's cumulative batch-size counts (``GET /v1/stats``); one replica, so one answer covers it."""
    stats = httpx.get(f"{base}/{mode}/v1/stats", timeout=30).raise_for_status().json()
    return collections.Counter({int(k): v for k, v in stats["batch_size_counts"].items()})


def mean_batch(counts: collections.Counter) -> float:
    return sum(k * v for k, v in counts.items()) / max(1, sum(counts.values()))



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="run or HF model directory (default: train a tiny synthetic student)")
    source.add_argument("--shape", choices=sorted(SHAPES),
                        help="serve a T5-small/base-sized student with random weights instead (no hub needed); "
                             "its outputs run to --max-new-tokens, so every request costs the same")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per mode and level")
    parser.add_argument("--requests-per-client", type=int, default=12,
                        help="requests each client sends per level (at least 64 per level in all)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=ServeConfig().batch_wait_timeout_s,
                        help="serve.batch_wait_timeout_s of both deployments (default: the config's)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--explain", action="store_true",
                        help="ask for rationales (explain mode: longer generations than predict)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    import ray
    import torch
    from ray import serve

    from qcrd_ray.config import Config
    from qcrd_ray.data import synthetic
    from serve.app import build

    model = args.model
    scratch = tempfile.TemporaryDirectory(prefix="serve-bench-")  # the built model (300 MB at --shape small)
    if model is None:
        model = Path(scratch.name) / "model"
        torch.set_num_threads(1)
        if args.shape:
            random_student(model, args.shape)
        else:
            print(f"training a tiny synthetic student ({args.train_steps} steps) into {model}", flush=True)
            train_tiny_student(model, args.train_steps, train_size=400)
    questions = [r["input"] for r in synthetic.make_split("test", train_size=1, eval_size=200, seed=1)]

    # its own local Ray: on a machine where others run Ray, a bare init would try to join theirs
    ray.init(address="local", num_cpus=2, configure_logging=False)
    port = free_port()
    # access logs (proxy's and replicas') would cost both modes CPU the 2 shared cores do not have
    quiet = {"enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    base = f"http://127.0.0.1:{port}"
    modes = {"batched": args.max_batch_size, "unbatched": 1}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        # both deployments stay up (one replica each, same settings but the batch size) and the modes alternate
        # within each level, so a change in the shared machine's load hits both alike
        for mode, batch_size in modes.items():
            cfg = Config().replace(serve={
                "min_replicas": 1, "max_replicas": 1, "max_batch_size": batch_size,
                "batch_wait_timeout_s": args.batch_wait_timeout_s, "max_ongoing_requests": max(levels) * 2,
                "max_queued_requests": -1, "max_new_tokens": args.max_new_tokens,
            })
            serve.run(build(model, cfg, name=mode), name=mode, route_prefix=f"/{mode}", logging_config=quiet)
        for clients in levels:
            per_client = max(args.requests_per_client, -(-64 // clients))
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for mode in modes:  # warm-up at this concurrency (first calls, connections): not measured
                asyncio.run(_load(f"{base}/{mode}/v1/predict", questions, clients, 2, args.max_new_tokens,
                                  args.explain))
            before = {mode: batch_sizes(base, mode) for mode in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    runs[mode].append(asyncio.run(
                        _load(f"{base}/{mode}/v1/predict", questions, clients, per_client, args.max_new_tokens,
                              args.explain)))
            load = os.getloadavg()[0]  # the machine is shared: say how busy it was
            for mode in modes:
                sizes = batch_sizes(base, mode) - before[mode]  # this level's measured runs only
                row = {**summarize(clients, runs[mode]), "load_average": load, "mean_batch": mean_batch(sizes),
                       "batch_size_counts": dict(sorted(sizes.items()))}
                results[mode].append(row)
                print(f"{mode:9s} clients={clients:3d}  {row['rps']:7.2f} req/s (runs {row['rps_runs']})  "
                      f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"p99/p50 {row['p99_ms'] / row['p50_ms']:.2f}  mean batch {row['mean_batch']:.1f}  "
                      f"errors {row['errors']}  load {load:.1f}",
                      flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        scratch.cleanup()

    print("\n| clients | batched req/s | unbatched req/s | speedup | batched p50 / p99 ms | batched p99/p50 | "
          "unbatched p50 / p99 ms | mean batch | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b, u in zip(results["batched"], results["unbatched"]):
        print(f"| {b['clients']} | {b['rps']:.1f} | {u['rps']:.1f} | {b['rps'] / u['rps']:.2f}x | "
              f"{b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {b['p99_ms'] / b['p50_ms']:.2f} | "
              f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f} | {b['mean_batch']:.1f} | {b['load_average']:.0f} |")
    top_b, top_u = results["batched"][-1], results["unbatched"][-1]
    speedup, tail = top_b["rps"] / top_u["rps"], top_b["p99_ms"] / top_b["p50_ms"]
    print(f"\nat {top_b['clients']} clients: batched/unbatched req/s = {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: "
          f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'}); batched p99/p50 = {tail:.2f} "
          f"(target <= {TARGET_TAIL}: {'met' if tail <= TARGET_TAIL else 'MISSED'})")
    lone_b, lone_u = results["batched"][0], results["unbatched"][0]
    if lone_b["clients"] == 1:
        lone = lone_b["p50_ms"] / lone_u["p50_ms"]
        print(f"at 1 client: batched/unbatched p50 latency = {lone:.2f}x (target <= {TARGET_LONE}x: "
              f"{'met' if lone <= TARGET_LONE else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
