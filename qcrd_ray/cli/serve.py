"""``qcrd serve``: serve a trained student over HTTP with Ray Serve until Ctrl-C.

Two engines: ``qcrd`` (the default: ``serve/app.py``, either student family, on CPUs or GPUs) and ``vllm`` (a
causal student through Ray Serve LLM and vLLM on GPU nodes, ``serve/vllm.py``; not run on this project's
development machines, where vLLM cannot be installed)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qcrd_ray.cli import add_config_arguments, load_config_from_args
from serve.guard import API_KEY_ENV


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_OR_DIR",
                        help="a method of a run (RUN/<method>, as `qcrd run` prints), a run directory (its "
                        "train.method) or a Hugging Face model directory; a local path or a URI "
                        "(s3://bucket/run/qcrd): each replica then downloads the model into its node's cache")
    parser.add_argument("--engine", choices=("qcrd", "vllm"), default="qcrd",
                        help="qcrd (default): this project's server, either student family, with /v1/predict; "
                        "vllm: a causal student served by vLLM through Ray Serve LLM (ray.serve.llm) on GPU nodes, "
                        "OpenAI routes only; needs `pip install -e '.[gpu]'`")
    parser.add_argument("--write-config", metavar="FILE",
                        help="vllm: write the Serve config (import_path ray.serve.llm:build_openai_app) to FILE and "
                        "exit without deploying; deploy it with `serve deploy FILE` where vLLM is installed")
    parser.add_argument("--lora", action="store_true",
                        help="vllm: serve the run's base model and load its LoRA adapter (RUN/<method>/adapter, on "
                        "s3/gs/azure storage) on demand, as model <name>:adapter (default: the merged model)")
    parser.add_argument("--accelerator-type", metavar="TYPE",
                        help="vllm: the GPU type replicas need (Ray's accelerator types: H100, A100, L4, A10G, ...)")
    parser.add_argument("--host", help="interface to bind (default serve.host: 127.0.0.1, loopback only; "
                        "0.0.0.0 exposes the service on the network)")
    parser.add_argument("--port", type=int, help="HTTP port (default serve.port: 8000)")
    parser.add_argument("--name", help="model name clients see in responses and /v1/models "
                        "(default: <run>/<method> for a method of a run, else the directory's name)")
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"engine qcrd: require `Authorization: Bearer KEY` on every route but /healthz (401 "
                        f"without it); default ${API_KEY_ENV}, which keeps the key out of `ps` and shell history. "
                        f"Only its SHA-256 reaches the replicas")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    add_config_arguments(parser)
    parser.epilog = (
        "Routes (engine qcrd): POST /v1/predict, POST /v1/completions and POST /v1/chat/completions "
        "(OpenAI-compatible, `stream: true` for server-sent events), GET /v1/models, GET /v1/stats, GET /healthz, "
        "docs at /docs. A chat message without a `predict: `/`explain: ` prefix is asked in explain mode; a prompt "
        "over the run's student.max_input_len tokens gets a 422. Batching, replicas and limits: the serve.* keys "
        "of the config (`qcrd config show`). Engine vllm (causal students, GPU clusters; not tested here): "
        "`qcrd serve --engine vllm --model RUN/qcrd --write-config vllm.yaml` writes a Serve config for "
        "`serve deploy vllm.yaml`; without --write-config it deploys at once (vLLM must be installed).")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve_until_stopped(deploy: Callable[[], None]) -> None:
    """Run ``deploy`` (it starts Serve and prints where), then wait for Ctrl-C or SIGTERM and shut Serve down.
    SIGTERM stops it as cleanly as Ctrl-C from before the deploy on: the handler ``ray.init`` installed exits at
    once, and a stop that lands while Serve deploys (``serve.run`` returns up to a second after the app answers)
    would leave Serve's detached actors holding their CPUs on the cluster."""
    from ray import serve

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        deploy()
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("qcrd serve: shutting down", flush=True)
        serve.shutdown()


def _run_vllm(args: argparse.Namespace, cfg) -> int:
    from serve import vllm

    try:
        target = vllm.resolve_target(args.model, cfg, args.name, lora=args.lora)
        config = vllm.serve_config(target, cfg.serve, args.accelerator_type)
    except (FileNotFoundError, vllm.VllmError) as e:
        print(f"qcrd serve: {e}", file=sys.stderr)
        return 2
    clients = f"model {target.model_id!r}"
    if target.lora_model:
        clients += f", the LoRA adapter as {target.lora_model!r}"
    if args.write_config:
        path = Path(args.write_config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(vllm.config_yaml(config, target))
        print(f"qcrd serve: wrote the Ray Serve LLM config for {target.model_source} to {path}.\n"
              f"Deploy it where vLLM is installed ({vllm.INSTALL_HINT}): serve deploy {path}  (or: serve run {path})\n"
              f"Clients: the OpenAI API at http://{cfg.serve.host}:{cfg.serve.port}/v1, {clients}.")
        if not target.model_source.startswith(("s3://", "gs://", "abfss://", "azure://")) and Path(
                target.model_source).exists():
            print("qcrd serve: the model is a local path: every GPU node must see it there (a shared filesystem), "
                  "or serve the run from storage (s3://...)")
        return 0

    try:
        vllm.require_vllm()  # before Ray starts: without vLLM there is nothing to deploy
    except ImportError as e:
        print(f"qcrd serve: {e}", file=sys.stderr)
        return 2
    from qcrd_ray.ray_utils import init_ray

    init_ray(args.address)

    def deploy() -> None:
        vllm.deploy(config)
        print(f"qcrd serve: vLLM serving {target.model_source} at http://{cfg.serve.host}:{cfg.serve.port}/v1 "
              f"({clients}). Ctrl-C stops it.", flush=True)

    _serve_until_stopped(deploy)
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = load_config_from_args(args, host="serve.host", port="serve.port")  # validates before Ray starts
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.engine == "vllm":
        if api_key:
            print(f"qcrd serve: --api-key / ${API_KEY_ENV} apply to engine qcrd only: put the vLLM service behind "
                  f"your gateway's auth", file=sys.stderr)
            return 2
        return _run_vllm(args, cfg)
    given = [flag for flag, value in (("--write-config", args.write_config), ("--lora", args.lora),
                                      ("--accelerator-type", args.accelerator_type)) if value]
    if given:
        print(f"qcrd serve: {', '.join(given)} go with --engine vllm", file=sys.stderr)
        return 2

    from ray import serve

    from qcrd_ray.ray_utils import init_ray
    from serve.app import build

    try:
        app = build(args.model, cfg, args.name, api_key)  # a missing or incomplete model fails here, before Ray starts
    except FileNotFoundError as e:
        print(f"qcrd serve: {e}", file=sys.stderr)
        return 2
    init_ray(args.address)

    def deploy() -> None:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(app, name="qcrd", route_prefix="/", blocking=False)
        host = "localhost" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
        print(f"qcrd serve: serving {args.model} at http://{host}:{cfg.serve.port} (POST /v1/predict, "
              f"/v1/completions, /v1/chat/completions; docs at /docs). Ctrl-C stops it.", flush=True)
        if api_key:
            print("qcrd serve: an API key is required (Authorization: Bearer <key>) on every route but /healthz",
                  flush=True)
        elif cfg.serve.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"qcrd serve: warning: listening on {cfg.serve.host} with no API key: anyone who reaches the port "
                  f"can use the model (set ${API_KEY_ENV} or --api-key)", flush=True)

    _serve_until_stopped(deploy)
    return 0
