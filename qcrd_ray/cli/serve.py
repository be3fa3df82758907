"""``qcrd serve``: serve a trained student over HTTP with Ray Serve until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from qcrd_ray.cli import add_config_arguments, load_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_OR_DIR",
                        help="a method of a run (RUN/<method>, as `qcrd run` prints), a run directory (its "
                        "train.method) or a Hugging Face model directory; a local path or a URI "
                        "(s3://bucket/run/qcrd): each replica then downloads the model into its node's cache")
    parser.add_argument("--host", help="interface to bind (default serve.host: 127.0.0.1, loopback only; "
                        "0.0.0.0 exposes the service on the network)")
    parser.add_argument("--port", type=int, help="HTTP port (default serve.port: 8000)")
    parser.add_argument("--name", help="model name clients see in responses and /v1/models "
                        "(default: <run>/<method> for a method of a run, else the directory's name)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    add_config_arguments(parser)
    parser.epilog = ("Routes: POST /v1/predict, POST /v1/completions (OpenAI-compatible), GET /v1/models, "
                     "GET /v1/stats, GET /healthz, docs at /docs. Batching, replicas and limits: the serve.* "
                     "keys of the config (`qcrd config show`).")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    cfg = load_config_from_args(args, host="serve.host", port="serve.port")  # validates before Ray starts

    from ray import serve

    from qcrd_ray.ray_utils import init_ray
    from serve.app import build

    try:
        app = build(args.model, cfg, args.name)  # a missing or incomplete model fails here, before Ray starts
    except FileNotFoundError as e:
        print(f"qcrd serve: {e}", file=sys.stderr)
        return 2
    init_ray(args.address)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name="qcrd", route_prefix="/", blocking=False)
    host = "localhost" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    print(f"qcrd serve: serving {args.model} at http://{host}:{cfg.serve.port} "
          f"(POST /v1/predict, /v1/completions; docs at /docs). Ctrl-C stops it.", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` and process managers stop it as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("qcrd serve: shutting down", flush=True)
        serve.shutdown()
    return 0
