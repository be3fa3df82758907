"""Teacher generation on an autoscaling cluster: the actor pool grows from ``teacher.min_actors`` to
``teacher.max_actors`` as the autoscaler adds nodes, and the nodes go again once the teach is over.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``, the ``fake_multinode`` node type) is a real autoscaler whose
"nodes" are raylets on this machine: a head with no CPUs, worker nodes of 1 CPU each, launched on demand and
terminated after ``--idle-s`` idle. The teach is ``run_teacher`` with the http backend against a loopback
OpenAI-compatible server that answers each request after ``--latency-s`` (a remote LLM's latency, so the pool has
work to scale for), one 1-CPU actor per node. A thread samples, every second, the live worker nodes and the live
teacher actors (GCS tables); the figure and a summary line go to ``--figure`` and stdout.

    python benchmarks/autoscaling.py                                   # 1 -> 3 actors, figure in docs/figures
    python benchmarks/autoscaling.py --max-actors 2 --examples 60      # smoke run

Its own head on a free port and its own temp dir (other local Rays are left alone); everything it started is
killed at the end, found by that temp dir in its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "<Explanation>: I add the two numbers together. <Answer>: 8"


def autoscaler_config(gcs_address: str, max_nodes: int, idle_s: float) -> dict:
    """A fake multi-node cluster: a head of 0 CPUs and up to ``max_nodes`` worker nodes of 1 CPU."""
    return {
        "cluster_name": "qcrd-autoscaling-bench", "max_workers": max_nodes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # a small object store each: the default (30 % of memory per "node") would overcommit /dev/shm
            "cpu_node": {"resources": {"CPU": 1, "object_store_memory": 200 * 2**20}, "node_config": {},
                         "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_s / 60,
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def start_head(config: dict, port: int, temp_dir: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={temp_dir}",
                    f"--object-store-memory={200 * 2**20}", "--include-dashboard=false", f"--autoscaling-config={f.name}"],
                   env=env, check=True, capture_output=True, text=True)


def kill_cluster(marker: str) -> None:
    """Every process whose command line names ``marker`` (this cluster's temp dir: head, autoscaler, fake nodes
    and their workers all name their session folder under it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def sample(stop: threading.Event, samples: list, t0: float) -> None:
    import ray
    from ray._private import state

    while not stop.wait(1.0):
        nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        actors = sum(1 for a in state.actors().values()
                     if "MapWorker" in a["ActorClassName"] and a["State"] == "ALIVE")
        samples.append((time.monotonic() - t0, nodes, actors))


def plot(samples: list, teach: tuple[float, float], max_actors: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, nodes, actors = zip(*samples)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.step(t, nodes, where="post", label="worker nodes (1 CPU each)")
    ax.step(t, actors, where="post", label="teacher actors", linestyle="--")
    ax.axvspan(*teach, color="grey", alpha=0.15, label="qcrd teach running")
    ax.set_xlabel("seconds since the head started")
    ax.set_yticks(range(max_actors + 2))
    ax.set_title("Teacher generation on Ray's fake multi-node autoscaler")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-actors", type=int, default=1)
    parser.add_argument("--max-actors", type=int, default=3)
    parser.add_argument("--examples", type=int, default=200, help="questions taught (k=2 samples each)")
    parser.add_argument("--latency-s", type=float, default=0.5, help="the teacher server's answer time")
    parser.add_argument("--idle-s", type=float, default=15.0, help="idle time before a node is terminated")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "autoscaling.png")
    args = parser.parse_args()

    import ray

    from qcrd_ray.config import Config
    from qcrd_ray.teacher.pipeline import run_teacher
    from qcrd_ray.testing import HoldingTeacher, free_port

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token for head or driver
    port, temp_dir = free_port(), tempfile.mkdtemp(prefix="qcrd-as-")
    ip = ray.util.get_node_ip_address()
    start_head(autoscaler_config(f"{ip}:{port}", args.max_actors, args.idle_s), port, temp_dir)
    t0 = time.monotonic()
    server = HoldingTeacher(ANSWER, answer_freely=0, hold_s=args.latency_s)  # never resumed: every answer waits
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop, samples, t0), daemon=True)
    try:
        ray.init(address=f"{ip}:{port}", log_to_driver=False)
        sampler.start()
        cfg = Config().replace(
            data={"synthetic_train_size": args.examples},
            teacher={"backend": "http", "model": "m", "base_url": server.base_url, "k": 2, "shard_rows": 20,
                     "batch_size": 2, "min_actors": args.min_actors, "max_actors": args.max_actors,
                     "num_cpus": 1, "max_concurrency": 1, "timeout_s": 60, "max_retries": 0})
        with tempfile.TemporaryDirectory() as out:
            start = time.monotonic() - t0
            summary = run_teacher(cfg, out)
            end = time.monotonic() - t0
        deadline = time.monotonic() + args.idle_s * 4 + 60
        while time.monotonic() < deadline and not (samples and samples[-1][1] == 0):
            time.sleep(1)
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        server.close()
        ray.shutdown()
        kill_cluster(temp_dir)  # every process of this cluster names its session folder, under temp_dir
    peak_actors = max(a for _, _, a in samples)
    peak_nodes = max(n for _, n, _ in samples)
    at_peak = next(t for t, _, a in samples if a == peak_actors)
    down = next((t for t, n, _ in samples if t > end and n == 0), None)
    plot(samples, (start, end), args.max_actors, args.figure)
    print(json.dumps({"samples": summary["samples"], "request_failures": summary["request_failures"],
                      "teach_s": round(end - start, 1), "peak_actors": peak_actors, "peak_nodes": peak_nodes,
                      "actors_at_peak_after_s": round(at_peak - start, 1),
                      "nodes_gone_after_teach_s": None if down is None else round(down - end, 1),
                      "figure": str(args.figure)}))


if __name__ == "__main__":
    sys.exit(main())
