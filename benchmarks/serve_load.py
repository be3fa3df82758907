"""Load test of the Serve application: requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients, with
dynamic batching (serve.max_batch_size) and without it (max_batch_size=1), in the same run on the same replica
settings (both deployed side by side, runs alternating), then the ratios.

    python benchmarks/serve_load.py                      # trains a tiny synthetic student first (~20 s)
    python benchmarks/serve_load.py --model runs/demo    # a run directory or an HF model directory

Each client is a closed loop (send, wait for the answer, send the next) of ``POST /v1/predict`` with one
synthetic test question at temperature 0. One replica (autoscaling pinned) so the comparison isolates batching.
Starts its own local Ray and shuts it down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

TARGET_SPEEDUP = 3.0  # batched req/s over unbatched at 16 clients
TARGET_TAIL = 2.0  # p99 / p50


def train_synthetic_student(path: Path, steps: int) -> None:
    """A tiny T5 fine-tuned for ``steps`` steps on the synthetic task in both modes (predict: the equation;
    explain: a one-sentence rationale + the equation), so outputs are short and stable."""
    import torch

    from qcrd_ray import student
    from qcrd_ray.config import StudentConfig
    from qcrd_ray.data import prompts, synthetic

    rows = synthetic.make_split("train", train_size=400, eval_size=50, seed=0)
    pairs = []
    for r in rows:
        pairs.append((prompts.student_input("predict", r["input"]), r["label"]))
        pairs.append((prompts.student_input("explain", r["input"]),
                      prompts.explain_target("We combine the two numbers the question gives.", r["label"])))
    model, tok = student.load_student(StudentConfig(), [t for pair in pairs for t in pair])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = pairs[(step * 16) % len(pairs):][:16]
        enc = tok([a for a, _ in batch], text_target=[b for _, b in batch], return_tensors="pt", padding=True)
        enc["labels"][enc["labels"] == tok.pad_token_id] = -100
        loss = model(**enc).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.save_student(model, tok, path)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run or HF model directory (default: train a tiny synthetic student)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per mode and level")
    parser.add_argument("--requests-per-client", type=int, default=12,
                        help="requests each client sends per level (at least 64 per level in all)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
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
    from qcrd_ray.ray_utils import init_ray
    from serve.app import build

    model = args.model
    if model is None:
        model = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "model"
        torch.set_num_threads(1)
        print(f"training a tiny synthetic student ({args.train_steps} steps) into {model}", flush=True)
        train_synthetic_student(model, args.train_steps)
    questions = [r["input"] for r in synthetic.make_split("test", train_size=1, eval_size=200, seed=1)]

    init_ray(num_cpus=2)
    port = _free_port()
    # per-request access logs would cost both modes CPU the 2 shared cores do not have
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
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
            serve.run(build(model, cfg, name=mode), name=mode, route_prefix=f"/{mode}")
        for clients in levels:
            per_client = max(args.requests_per_client, -(-64 // clients))
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for mode in modes:  # warm-up at this concurrency (first calls, connections): not measured
                asyncio.run(_load(f"{base}/{mode}/v1/predict", questions, clients, 2, args.max_new_tokens,
                                  args.explain))
            for _ in range(args.repeats):
                for mode in modes:
                    runs[mode].append(asyncio.run(
                        _load(f"{base}/{mode}/v1/predict", questions, clients, per_client, args.max_new_tokens,
                              args.explain)))
            load = os.getloadavg()[0]  # the machine is shared: say how busy it was
            for mode in modes:
                row = {**summarize(clients, runs[mode]), "load_average": load}
                results[mode].append(row)
                print(f"{mode:9s} clients={clients:3d}  {row['rps']:7.2f} req/s (runs {row['rps_runs']})  "
                      f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"p99/p50 {row['p99_ms'] / row['p50_ms']:.2f}  errors {row['errors']}  load {load:.1f}",
                      flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    print("\n| clients | batched req/s | unbatched req/s | speedup | batched p50 / p99 ms | batched p99/p50 | "
          "unbatched p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b, u in zip(results["batched"], results["unbatched"]):
        print(f"| {b['clients']} | {b['rps']:.1f} | {u['rps']:.1f} | {b['rps'] / u['rps']:.2f}x | "
              f"{b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {b['p99_ms'] / b['p50_ms']:.2f} | "
              f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f} |")
    top_b, top_u = results["batched"][-1], results["unbatched"][-1]
    speedup, tail = top_b["rps"] / top_u["rps"], top_b["p99_ms"] / top_b["p50_ms"]
    print(f"\nat {top_b['clients']} clients: batched/unbatched req/s = {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: "
          f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'}); batched p99/p50 = {tail:.2f} "
          f"(target <= {TARGET_TAIL}: {'met' if tail <= TARGET_TAIL else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
