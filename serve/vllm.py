"""``qcrd serve --engine vllm``: a causal student served by vLLM through Ray Serve LLM (``ray.serve.llm``).

The application is ``ray.serve.llm:build_openai_app`` with one ``LLMConfig``: vLLM's own OpenAI-compatible server
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, streaming), continuous batching and paged
attention, on GPU replicas autoscaled from the ``serve.*`` keys. Its config is built here as plain data by pure
functions (:func:`llm_config`, :func:`serve_config`), so it is tested without vLLM and can be written to a Serve
config file that ``serve deploy FILE`` / ``serve run FILE`` deploys where vLLM is installed
(``pip install -e '.[gpu]'``, i.e. ``ray[llm]``).

NOT RUN HERE: vLLM cannot be installed on the machines this project is developed and tested on, so this path has
only been checked against the schema of ray 2.60's ``LLMConfig`` / Serve config files, never deployed.

What differs from the default engine (``serve/app.py``):

- causal students only: vLLM dropped encoder-decoder models, so a seq2seq (T5) student is refused;
- no ``/v1/predict``; ``/v1/completions`` sends the prompt to the model verbatim (not through the chat template,
  so a student trained through one should be asked through ``/v1/chat/completions``), and chat needs a tokenizer
  with a chat template; the user message is not given an ``explain: `` prefix: write ``explain: x`` /
  ``predict: x`` yourself;
- prompt + completion are bounded by vLLM's ``max_model_len`` (``student.max_input_len`` + ``serve.max_new_tokens``,
  capped by the model's context), which vLLM enforces with its own 400;
- the model must be readable by every GPU node: a storage URI (``s3://…``, downloaded by each replica) or a path
  on a shared filesystem;
- LoRA (``--lora``): the base model is served and the run's adapter loaded on demand through Ray Serve LLM's
  multi-LoRA support (``lora_config.dynamic_lora_loading_path``: the folder holding the adapter folders, on
  s3/gs/azure only); clients name the model ``<model_id>:<adapter folder>``. Without ``--lora`` a LoRA run is served
  merged (``RUN/<method>/model``), like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qcrd_ray.config import Config, ServeConfig

IMPORT_PATH = "ray.serve.llm:build_openai_app"
APP_NAME = "qcrd"
# where Ray Serve LLM loads LoRA adapters from (its LoraConfig validator accepts only these)
LORA_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
# vLLM's accepted values of max_lora_rank: an adapter's rank is rounded up to the next one
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
INSTALL_HINT = "pip install -e '.[gpu]'"


class VllmError(ValueError):
    """A model or setting the vLLM engine cannot serve, with the reason."""


@dataclass(frozen=True)
class VllmTarget:
    """What one ``LLMConfig`` serves."""

    model_id: str  # the name clients send as `model`
    model_source: str  # the merged model (or, with LoRA, the base): a storage URI, a shared path or a hub name
    max_model_len: int | None  # prompt + completion, as vLLM bounds them
    lora_root: str | None = None  # dynamic_lora_loading_path: the folder of adapter folders
    lora_name: str | None = None  # the run's adapter folder under lora_root
    lora_rank: int | None = None  # the adapter's rank (vLLM's max_lora_rank is at least this)

    @property
    def lora_model(self) -> str | None:
        """What clients send as ``model`` to get the adapter (Ray Serve LLM's ``<base_model_id>:<adapter>``)."""
        return f"{self.model_id}:{self.lora_name}" if self.lora_name else None


def lora_rank_for_vllm(rank: int) -> int:
    """vLLM's ``max_lora_rank`` for an adapter of ``rank``: the smallest accepted value at least as large."""
    for value in VLLM_LORA_RANKS:
        if value >= rank:
            return value
    raise VllmError(f"student.lora.r={rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")


def llm_config(target: VllmTarget, serve: ServeConfig, accelerator_type: str | None = None,
               max_adapters: int = 4) -> dict[str, Any]:
    """The ``LLMConfig`` (as a dict, the form ``build_openai_app``'s ``llm_configs`` takes) for ``target``:
    replicas, autoscaling and overload bounds from the serve config, vLLM's ``max_model_len``, and with LoRA the
    multi-LoRA settings (``lora_config`` + ``enable_lora`` / ``max_lora_rank`` / ``max_loras``, the last equal to
    ``max_num_adapters_per_replica`` as Ray Serve LLM asks)."""
    for where in (target.model_source, target.lora_root):
        if where and "://" in where and "?" in where:
            raise VllmError(f"{where}: Ray Serve LLM does not read storage options in a URI (?...); give the bare URI "
                            "and the endpoint and credentials in the environment (AWS_ENDPOINT_URL, ...)")
    engine_kwargs: dict[str, Any] = {}
    if target.max_model_len is not None:
        engine_kwargs["max_model_len"] = target.max_model_len
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": target.model_id, "model_source": target.model_source},
        "engine_kwargs": engine_kwargs,
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": serve.min_replicas,
                "initial_replicas": max(serve.min_replicas, 1),
                "max_replicas": serve.max_replicas,
                "target_ongoing_requests": serve.target_ongoing_requests,
            },
            "max_ongoing_requests": serve.max_ongoing_requests,
            "max_queued_requests": serve.max_queued_requests,
        },
    }
    if target.lora_root is not None:
        if not target.lora_root.startswith(LORA_SCHEMES):
            raise VllmError(f"{target.lora_root}: Ray Serve LLM loads LoRA adapters from cloud storage only "
                            f"({', '.join(LORA_SCHEMES)}); put the run on storage, or serve the merged model "
                            "(without --lora)")
        config["lora_config"] = {"dynamic_lora_loading_path": target.lora_root,
                                 "max_num_adapters_per_replica": max_adapters}
        engine_kwargs.update(enable_lora=True, max_lora_rank=lora_rank_for_vllm(target.lora_rank or 8),
                             max_loras=max_adapters)
    if accelerator_type:
        config["accelerator_type"] = accelerator_type
    return config


def serve_config(target: VllmTarget, serve: ServeConfig, accelerator_type: str | None = None,
                 app_name: str = APP_NAME) -> dict[str, Any]:
    """A whole Serve config file (``serve deploy FILE`` / ``serve run FILE``): the HTTP options from the serve
    config and one application, ``ray.serve.llm:build_openai_app`` with ``llm_configs: [<llm_config>]``."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": serve.host, "port": serve.port},
        "applications": [{
            "name": app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"llm_configs": [llm_config(target, serve, accelerator_type)]},
        }],
    }


def config_yaml(config: dict[str, Any], target: VllmTarget) -> str:
    """The Serve config as YAML, with a header saying what it serves and how to deploy it."""
    lines = [
        f"# qcrd serve --engine vllm: {target.model_id} from {target.model_source}",
        "# Deploy where vLLM is installed (" + INSTALL_HINT + "):  serve deploy THIS_FILE  (or: serve run THIS_FILE)",
        "# Clients: the OpenAI API at http://HOST:PORT/v1, model " + repr(target.model_id)
        + (f"; the LoRA adapter as {target.lora_model!r}" if target.lora_model else ""),
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# from a run to a target (reads the run's configs, local or on storage)


def _read_json(location: str) -> dict | None:
    from qcrd_ray import storage

    try:
        return json.loads(storage.read_text(location))
    except (FileNotFoundError, OSError, ValueError):
        return None


def _model_config(source: str) -> dict | None:
    """The Hugging Face config of a model folder (a path or a URI) or hub name, as a dict; None if unreadable."""
    from qcrd_ray import storage

    found = _read_json(storage.join(source, "config.json"))
    if found is not None or storage.is_uri(source) or Path(source).exists():
        return found
    try:  # a hub name (the base of a LoRA run): from the local cache, or the hub when online
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).to_dict()
    except Exception:  # noqa: BLE001 - unknown here; vLLM says what it thinks when it loads it
        return None


def check_causal(hf_config: dict | None, what: str) -> None:
    """Refuse a model vLLM cannot serve as a student: an encoder-decoder (seq2seq) one."""
    if hf_config and hf_config.get("is_encoder_decoder"):
        raise VllmError(
            f"{what} is a seq2seq (encoder-decoder, model_type {hf_config.get('model_type')!r}) student: vLLM serves "
            "decoder-only models only (it dropped encoder-decoder support); serve it with --engine qcrd")


def max_model_len(max_input_len: int, max_new_tokens: int, hf_config: dict | None) -> int:
    """vLLM's bound on prompt + completion: the student's input length plus the served completion budget,
    capped by the model's context length where its config says."""
    total = max_input_len + max_new_tokens
    context = (hf_config or {}).get("max_position_embeddings") or (hf_config or {}).get("n_positions")
    return min(total, context) if context else total


def resolve_target(model: str, cfg: Config, name: str | None = None, lora: bool = False) -> VllmTarget:
    """A run, method or model directory (``qcrd_ray.runs.resolve_model``) → what vLLM serves. The merged model by
    default; with ``lora`` (or given an adapter folder) the adapter's base, with the adapter loadable on demand."""
    from qcrd_ray import storage
    from qcrd_ray.runs import resolve_model
    from qcrd_ray.students import lora as lora_lib

    resolved = resolve_model(model)
    trained = resolved.config or cfg
    model_id = name or resolved.name
    adapter = None
    if storage.is_file(storage.join(resolved.model_dir, lora_lib.ADAPTER_CONFIG)):
        adapter = resolved.model_dir
    elif lora:
        candidate = resolved.method.adapter if resolved.method is not None else None
        if candidate is None or not storage.is_file(storage.join(candidate, lora_lib.ADAPTER_CONFIG)):
            raise VllmError(f"{model}: --lora needs the run's LoRA adapter (RUN/<method>/adapter/"
                            f"{lora_lib.ADAPTER_CONFIG}); this run has none (student.lora.r was 0)")
        adapter = candidate
    if adapter is None:
        hf_config = _model_config(resolved.model_dir)
        check_causal(hf_config, resolved.model_dir)
        return VllmTarget(model_id, resolved.model_dir,
                          max_model_len(trained.student.max_input_len, cfg.serve.max_new_tokens, hf_config))
    adapter_config = _read_json(storage.join(adapter, lora_lib.ADAPTER_CONFIG)) or {}
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise VllmError(f"{adapter}/{lora_lib.ADAPTER_CONFIG} names no base_model_name_or_path")
    hf_config = _model_config(base)
    check_causal(hf_config, f"the base of {adapter} ({base})")
    root = adapter.rstrip("/").rsplit("/", 1)[0] if storage.is_uri(adapter) else str(Path(adapter).parent)
    return VllmTarget(model_id, base,
                      max_model_len(trained.student.max_input_len, cfg.serve.max_new_tokens, hf_config),
                      lora_root=root, lora_name=storage.basename(adapter), lora_rank=adapter_config.get("r"))


def require_vllm():
    """``ray.serve.llm.build_openai_app``; without vLLM, an ImportError that says what to install."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as e:
        raise ImportError(
            f"--engine vllm needs vLLM (ray.serve.llm): {INSTALL_HINT} on the GPU nodes, or write the config with "
            f"--write-config FILE and `serve deploy FILE` where vLLM is installed (here: {e})") from e
    return build_openai_app


def deploy(config: dict[str, Any]) -> None:
    """Deploy the config's application on the connected Ray cluster (``serve.start`` + ``serve.run``); needs vLLM
    (:func:`require_vllm`)."""
    build_openai_app = require_vllm()
    from ray import serve

    [app] = config["applications"]
    serve.start(http_options=config["http_options"])
    serve.run(build_openai_app(app["args"]), name=app["name"], route_prefix=app["route_prefix"], blocking=False)
