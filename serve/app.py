"""The Ray Serve application: the distilled student behind a batched, autoscaled, validated HTTP API.

Routes (FastAPI through ``@serve.ingress``; OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /v1/predict``           task + input (or structured fields) → label (+ rationale with ``explain``)
- ``POST /v1/completions``       OpenAI-compatible (``prompt``, ``max_tokens``, ``temperature``, ``n``, ``stop``,
  ``seed``, ``stream``); the prompt is a student input (``predict: x`` / ``explain: x``), rendered as the
  student reads it (a causal student's chat template where it has one)
- ``POST /v1/chat/completions``  OpenAI-compatible chat (``messages``, ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``n``, ``stop``, ``seed``, ``stream``): the messages go through the student's chat template,
  or the last user message is the task prompt where the tokenizer has none; a user message without a
  ``predict: `` / ``explain: `` prefix is a question asked in explain mode (``serve.schemas.student_message``)
- ``GET  /v1/models``            the served model (OpenAI schema)
- ``GET  /v1/stats``             this replica's dynamic-batching counters (how many batches of each size it ran)
- ``GET  /healthz``              liveness (the only route open without the API key)

Before any route parses a request, ``serve/guard.py`` checks the API key when the server has one (``qcrd serve
--api-key`` or ``$QCRD_SERVE_API_KEY``; ``Authorization: Bearer <key>``, else 401) and caps the body
(``serve.max_body_bytes``, else 413). Every number a request carries is bounded (422).

Every input a request carries (a list, or ``n`` samples) is queued separately into one batching queue
(``serve/batching.py``: a batch is taken when the model is free, with a window that adapts to the load), so
inputs from concurrent requests share a ``generate`` call. A batch is split by (temperature, max_new_tokens,
seed), the settings ``generate`` takes per call; a seeded sampled request gets a call of its own, so its output
never depends on which requests shared its batch. (Sampling draws from the process's one global generator: a
seed reproduces a request's output when no other sampled generation runs beside it on the replica; like OpenAI's
``seed``, it is best effort under concurrent sampling.) Overload is bounded: a replica takes at most
``serve.max_ongoing_requests`` requests, the proxy queues at most ``serve.max_queued_requests`` more, and the
rest get HTTP 503 at once.

``stream: true`` (completions and chat) answers with server-sent events in OpenAI's chunk format, ending in
``data: [DONE]``. A streamed request bypasses the dynamic batcher: it runs its own ``generate`` (the student
family's ``stream``, a ``TextIteratorStreamer``) in a thread beside the batches, and its pieces reach the event
loop through an asyncio queue. It takes one prompt and ``n=1`` (else 422). Stop sequences apply to streamed text
too: a tail that could begin one is held back until it cannot. A stream that ends early (a stop sequence, a
client gone) stops sending at once, and its generation stops at its next token.

A prompt longer than the student reads (``student.max_input_len`` of the run, or where smaller what the model's
context length leaves a decoder-only student's completion) is refused with a 422 naming both lengths, on every
route: it is never truncated silently.

Run it with ``qcrd serve --model RUN_OR_DIR``, ``serve run serve/config.yaml`` or
``serve run serve.app:build_app model=RUN_OR_DIR``. RUN_OR_DIR may be a storage URI (``s3://bucket/run/qcrd``):
the driver reads the run's config from it, and each replica downloads the model into its node's cache. For a
causal student on a GPU cluster, ``qcrd serve --engine vllm`` serves it through ``ray.serve.llm`` instead
(``serve/vllm.py``).
"""

# no `from __future__ import annotations`: FastAPI must resolve the route annotations on the ingress class

import asyncio
import collections
import copy
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from qcrd_ray import storage
from qcrd_ray.config import Config, ServeConfig, load_config
from qcrd_ray.data.tasks import get_task
from qcrd_ray.isolation import isolate_failures
from serve.batching import Batcher
from serve.guard import API_KEY_ENV, GuardSettings, RequestGuard, key_digest
from serve.schemas import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    Limits,
    PredictBatchResponse,
    PredictRequest,
    PredictResponse,
    RequestError,
    StreamAssembler,
    chat_response,
    check_encodable,
    check_prompt_lengths,
    completion_response,
    describe_validation_errors,
    error_body,
    route_error_message,
    input_params,
    interpret_output,
    models_response,
    plan_chat,
    plan_completion,
    plan_predict,
    served_tasks,
    sse_event,
)

logger = logging.getLogger("qcrd.serve")

DEPLOYMENT_NAME = "StudentServer"

api = FastAPI(
    title="qcrd student",
    description="A QCRD-distilled student (seq2seq or decoder-only): task predictions with rationales, and "
    "OpenAI-compatible completions and chat completions, streamed on request.",
)
api.add_middleware(RequestGuard)  # API key (401) and body cap (413) before any route parses a request


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, message, param = describe_validation_errors(exc.errors())
    return JSONResponse(error_body(message, param), status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _route_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (404 no such route, 405 a method the route does not take) in the same shape."""
    message = route_error_message(request.method, request.url.path, exc.status_code, exc.detail,
                                  (exc.headers or {}).get("Allow"))
    return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    return JSONResponse(error_body(exc.message, exc.param, kind), status_code=exc.status)


@dataclass(frozen=True)
class GenerationItem:
    """One prompt to generate for (rendered as the student reads it): the unit queued for dynamic batching."""

    text: str
    temperature: float
    max_new_tokens: int
    seed: int | None
    request: int = 0  # which request it came from: a seeded sampled request's items share a call of their own


@dataclass(frozen=True)
class Generated:
    text: str
    cut_off: bool  # stopped at max_new_tokens before its end of sequence (OpenAI's finish_reason "length")


def batch_groups(items: list[GenerationItem]) -> dict[tuple, list[int]]:
    """Positions of a batch's items by the settings one ``generate`` call takes: (temperature, max_new_tokens,
    seed), and for a seeded sampled item its request (the seed restarts the generator: two requests sampled in one
    call would each get other draws than alone). Greedy decoding ignores the seed, so all greedy items with the
    same budget share one call, as do unseeded sampled ones."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        seeded = item.temperature > 0 and item.seed is not None
        key = (item.temperature, item.max_new_tokens, item.seed if seeded else None, item.request if seeded else None)
        groups.setdefault(key, []).append(i)
    return groups


def fetch_model(location: str) -> str:
    """The local folder a replica loads: a local path as it is (no copy); a URI downloaded into this node's
    cache (``storage.download_dir``), which refuses an upload without its completeness marker."""
    return str(storage.download_dir(location)) if storage.is_uri(location) else location


@dataclass(frozen=True)
class ServedModel:
    model_dir: str  # a local path or a storage URI: each replica fetches it on its own node
    name: str  # what clients see in responses and /v1/models
    task: str | None  # the training task (predict's default), when the run's config says
    answer_type: str  # how the training task's answers are parsed (data.answer_type; user tasks need it)
    max_input_len: int  # student.max_input_len: a longer prompt is refused (422), never truncated


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=2, health_check_timeout_s=30)
@serve.ingress(api)
class StudentServer:
    def __init__(self, served: ServedModel, serve_cfg: dict, api_key_sha256: str | None = None):
        from qcrd_ray.students import family_of, load_pretrained

        self.cfg = ServeConfig(**serve_cfg)
        api.state.guard = GuardSettings(self.cfg.max_body_bytes, api_key_sha256)  # read by RequestGuard
        self.limits = Limits.from_config(self.cfg)
        self.model_name = served.name
        self.train_task = served.task
        self.train_spec = get_task(served.task, served.answer_type) if served.task else None
        self.max_input_len = served.max_input_len
        self.tasks = served_tasks(served.task)
        self.created = int(time.time())
        local_dir = fetch_model(served.model_dir)
        self.model, self.tokenizer = load_pretrained(local_dir)
        self.model.eval()
        self.family = family_of(self.model)
        self.context_length = self.family.context_length(self.model)
        # A fast tokenizer is not safe to share between threads (encoding with padding changes its state: "Already
        # borrowed", or a batch padded on the wrong side). Each thread has its own: `self.tokenizer` is the batch
        # thread's, `self.text_tokenizer` the event loop's (rendering, lengths, counts), and each stream takes one
        # from a pool of copies for as long as its generation runs.
        self.text_tokenizer = copy.deepcopy(self.tokenizer)
        self._stream_tokenizers: queue.SimpleQueue = queue.SimpleQueue()
        self.batcher = Batcher(self._generate_batch, self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._requests = itertools.count()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        logger.info("serving %s (%s student) from %s (task %s)", served.name, self.family.name, local_dir, served.task)

    # ---------------------------------------------------------------------------------------------- batching

    async def _generate_batch(self, items: list[GenerationItem]) -> list[Generated | Exception]:
        self.batch_sizes[len(items)] += 1
        # generate() runs off the event loop so the replica keeps accepting (and batching) requests meanwhile
        return await asyncio.to_thread(self._generate_groups, items)

    def _generate_groups(self, items: list[GenerationItem]) -> list[Generated | Exception]:
        outputs: list[Generated | Exception] = [Generated("", False)] * len(items)
        for (temperature, max_new_tokens, seed, _), group in batch_groups(items).items():
            def run(texts: list[str]) -> list[Generated | Exception]:
                # prompts are rendered and their length checked before they are queued: no truncation here
                cut_off: list[bool] = []
                failed: list[int] = []  # a prompt that exhausts memory alone: an error for its request, not ""
                out = self.family.generate(self.model, self.tokenizer, texts, max_new_tokens=max_new_tokens,
                                           temperature=temperature, seed=seed, batch_size=len(texts),
                                           cut_off=cut_off, failed=failed)
                return [MemoryError("out of memory on this input alone") if i in failed else Generated(text, cut)
                        for i, (text, cut) in enumerate(zip(out, cut_off, strict=True))]

            for i, result in zip(group, isolate_failures(run, [items[i].text for i in group])):
                if isinstance(result, Exception):
                    logger.error("generation failed for one input", exc_info=result)
                outputs[i] = result
        return outputs

    async def _generate(self, texts: list[str], temperature: float, max_new_tokens: int,
                        seed: int | None) -> list[Generated]:
        request = next(self._requests)
        results = await asyncio.gather(
            *(self.batcher.submit(GenerationItem(t, temperature, max_new_tokens, seed, request)) for t in texts)
        )
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise RequestError(500, f"generation failed: {type(failed).__name__}: {failed}")
        return results

    def _count_tokens(self, text: str) -> int:
        return len(self.text_tokenizer(text, add_special_tokens=False).input_ids)

    def _prepare(self, texts: list[str], params: tuple[str, ...], max_new_tokens: int) -> tuple[list[str], list[int]]:
        """Student inputs → the prompts the model reads (``family.prompt``) and their token counts; a text the
        tokenizer cannot encode, or a prompt over the student's input length (or over what the model's context
        leaves beside ``max_new_tokens``), is refused (422) before queueing."""
        check_encodable(self.text_tokenizer, texts, params)
        rendered = [self.family.prompt(self.text_tokenizer, t) for t in texts]
        return rendered, self._check_lengths(rendered, params, max_new_tokens)

    def _check_lengths(self, rendered: list[str], params: tuple[str, ...], max_new_tokens: int) -> list[int]:
        lengths = self.family.prompt_lengths(self.text_tokenizer, rendered)
        check_prompt_lengths(lengths, params, self.max_input_len, self.context_length,
                             max_new_tokens if self.family.completion_in_context else 0)
        return lengths

    # --------------------------------------------------------------------------------------------- streaming

    def _stream_tokenizer(self):
        try:
            return self._stream_tokenizers.get_nowait()
        except queue.Empty:
            return copy.deepcopy(self.text_tokenizer)  # on the event loop, the only user of text_tokenizer

    async def _stream_pieces(self, prompt: str, temperature: float, max_new_tokens: int, seed: int | None,
                             cut_off: list[bool]) -> AsyncIterator[str]:
        """The output for one rendered prompt, piece by piece as ``family.stream`` generates it (``cut_off``
        receives at its end whether it stopped at its token budget). The generator runs in its own thread (not the
        batcher's), which hands each piece to the event loop through an asyncio queue. Closing this iterator early
        stops the hand-over and the generation, at its next token."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        abandoned = threading.Event()
        tokenizer = self._stream_tokenizer()

        def post(item: tuple) -> None:
            if abandoned.is_set():
                return
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the event loop is gone (the replica is shutting down)
                abandoned.set()

        def produce() -> None:
            try:
                for piece in self.family.stream(self.model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                                temperature=temperature, seed=seed, stop=abandoned,
                                                cut_off=cut_off):
                    post(("piece", piece))
                post(("end", None))
            except BaseException as e:  # noqa: BLE001 - handed to the response, which reports it
                post(("error", e))
            finally:
                self._stream_tokenizers.put(tokenizer)  # its generation is over: no thread uses it any more

        threading.Thread(target=produce, name="qcrd-serve-stream", daemon=True).start()
        try:
            while True:
                kind, value = await pieces.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            abandoned.set()

    def _event_stream(self, assembler: StreamAssembler, prompt: str, temperature: float, max_new_tokens: int,
                      seed: int | None) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            cut_off: list[bool] = []  # filled when the generation has ended
            pieces = self._stream_pieces(prompt, temperature, max_new_tokens, seed, cut_off)
            try:
                for chunk in assembler.start():
                    yield sse_event(chunk)
                async for piece in pieces:
                    for chunk in assembler.feed(piece):
                        yield sse_event(chunk)
                    if assembler.stopped:
                        break
                for chunk in assembler.finish(self._count_tokens, cut_off=bool(cut_off and cut_off[0])):
                    yield sse_event(chunk)
            except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                logger.error("streamed generation failed", exc_info=e)
                yield sse_event(error_body(f"generation failed: {type(e).__name__}: {e}", None, "server_error"))
            finally:
                await pieces.aclose()
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------------ routes

    @api.post("/v1/predict", response_model=PredictResponse | PredictBatchResponse,
              responses={400: {"description": "body is not JSON"}, 422: {"description": "invalid request"},
                         503: {"description": "overloaded; retry later"}})
    async def predict(self, req: PredictRequest) -> PredictResponse | PredictBatchResponse:
        """Label one question (``input`` a string, or the structured fields) or several (``input`` a list).
        A question whose prompt is longer than the student's input length is refused (422), not truncated."""
        from qcrd_ray.data import prompts

        plan = plan_predict(req, self.limits, self.tasks, self.train_task)
        texts = [prompts.student_input(plan.mode, t) for t in plan.texts]
        rendered, _ = self._prepare(texts, input_params("input", len(texts), plan.is_list), plan.max_new_tokens)
        outputs = await self._generate(rendered, plan.temperature, plan.max_new_tokens, plan.seed)
        task = self.train_spec if plan.task == self.train_task else plan.task
        predictions = [interpret_output(task, plan.mode, out, choices)
                       for out, choices in zip((o.text for o in outputs), plan.choices)]
        if plan.is_list:
            return PredictBatchResponse(model=self.model_name, predictions=predictions)
        return PredictResponse(model=self.model_name, **predictions[0].model_dump())

    @api.post("/v1/completions", response_model=CompletionResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "the completion; with stream: server-sent text_completion chunks"}})
    async def completions(self, req: CompletionRequest):
        """OpenAI-compatible text completion. The prompt is a student input (``predict: x`` or ``explain: x``): it
        is rendered as the student reads it (``family.prompt``: a causal student with a chat template gets it as a
        user message, as in training; a seq2seq student reads it as it is). A prompt over the student's input
        length gets a 422. ``stream: true`` sends ``text_completion`` chunks as server-sent events, then
        ``data: [DONE]``; a streamed request takes one prompt and n=1, and bypasses the dynamic batcher."""
        plan = plan_completion(req, self.limits, self.model_name)
        rendered, lengths = self._prepare(list(plan.prompts),
                                          input_params("prompt", len(plan.prompts), isinstance(req.prompt, list)),
                                          plan.max_new_tokens)
        if plan.stream:
            assembler = StreamAssembler("completion", self.model_name, plan.stop, lengths[0], plan.include_usage)
            return self._event_stream(assembler, rendered[0], plan.temperature, plan.max_new_tokens, plan.seed)
        texts = [p for p in rendered for _ in range(plan.n)]  # prompt-major, as OpenAI numbers choices
        outputs = await self._generate(texts, plan.temperature, plan.max_new_tokens, plan.seed)
        texts = [o.text for o in outputs]
        return completion_response(self.model_name, plan, texts, [o.cut_off for o in outputs],
                                   prompt_tokens=lengths, output_tokens=[self._count_tokens(t) for t in texts])

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "the chat completion; with stream: chat.completion.chunk events"}})
    async def chat_completions(self, req: ChatCompletionRequest):
        """OpenAI-compatible chat completion. Each user message is a student input: ``predict: x`` or
        ``explain: x`` as written, any other text a question asked in explain mode (``explain: `` is added), so
        the student writes its rationale and then its answer. The messages go through the student's chat
        template; a student without one (every seq2seq student) reads the last user message alone. A conversation
        over the student's input length gets a 422. ``stream: true`` sends ``chat.completion.chunk`` events (the
        role first, then the content, then the finish_reason), then ``data: [DONE]``; n=1 only, and the request
        bypasses the dynamic batcher."""
        from qcrd_ray.students import StudentError

        plan = plan_chat(req, self.limits, self.model_name)
        try:
            rendered = self.family.chat_prompt(self.text_tokenizer, list(plan.messages))
        except StudentError as e:
            raise RequestError(422, str(e), "messages") from e
        except Exception as e:  # a chat template may refuse a conversation (e.g. roles that do not alternate)
            raise RequestError(422, f"messages: the student's chat template refused them ({type(e).__name__}: "
                               f"{e})", "messages") from e
        check_encodable(self.text_tokenizer, [rendered], ("messages",))
        [length] = self._check_lengths([rendered], ("messages",), plan.max_new_tokens)
        if plan.stream:
            assembler = StreamAssembler("chat", self.model_name, plan.stop, length, plan.include_usage)
            return self._event_stream(assembler, rendered, plan.temperature, plan.max_new_tokens, plan.seed)
        outputs = await self._generate([rendered] * plan.n, plan.temperature, plan.max_new_tokens, plan.seed)
        texts = [o.text for o in outputs]
        return chat_response(self.model_name, plan, texts, [o.cut_off for o in outputs], prompt_tokens=length,
                             output_tokens=[self._count_tokens(t) for t in texts])

    @api.get("/v1/models")
    async def models(self) -> dict:
        return models_response(self.model_name, self.created)

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        """Dynamic-batching counters of the replica that answers (each replica counts its own; streamed requests
        bypass the batcher and are not counted)."""
        return {
            "replica": self.replica_id,
            "max_batch_size": self.cfg.max_batch_size,
            "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
            "batches": sum(self.batch_sizes.values()),
            "items": sum(size * count for size, count in self.batch_sizes.items()),
            "batch_size_counts": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    def check_health(self) -> None:
        """Ray Serve's health check (every ``health_check_period_s``): a replica whose batching loop died would
        queue requests forever, so it is reported unhealthy and replaced."""
        self.batcher.check()


# --------------------------------------------------------------------------------------------------------------
# building the application


def resolve_served_model(path: str | Path, cfg: Config, name: str | None = None) -> ServedModel:
    """A run directory, a method directory (``RUN/<method>``) or an HF model directory → what the deployment
    needs (``qcrd_ray.runs.resolve_model``). The task, answer type and input length come from the config the
    model was trained with when there is one, else from ``cfg``; the name defaults to the run's."""
    from qcrd_ray.runs import resolve_model

    resolved = resolve_model(str(path))
    trained = resolved.config or cfg
    task = resolved.config.data.task if resolved.config is not None else None
    return ServedModel(resolved.model_dir, name or resolved.name, task, trained.data.answer_type,
                       trained.student.max_input_len)


def deployment_options(cfg: ServeConfig) -> dict:
    """Ray Serve deployment options from the serve config (replicas, autoscaling, overload bounds, CPUs)."""
    return {
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(cfg.min_replicas, 1),
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus},
    }


def build(model: str | Path, cfg: Config | None = None, name: str | None = None,
          api_key: str | None = None) -> Application:
    """The bound application for ``serve.run`` (the CLI, tests and the benchmark call this). With ``api_key``,
    every route but ``/healthz`` wants ``Authorization: Bearer <api_key>``; only its SHA-256 reaches the replicas."""
    cfg = cfg or Config()
    served = resolve_served_model(model, cfg, name)
    return StudentServer.options(**deployment_options(cfg.serve)).bind(served, dataclasses.asdict(cfg.serve),
                                                                        key_digest(api_key))


def build_app(args: Mapping[str, Any]) -> Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: serve.app:build_app``).

    args: ``model`` (required: a run or HF model directory), ``config`` (a qcrd YAML), ``set`` (overrides, a
    list or a comma-separated string of ``serve.key=value``), ``name`` (the model name clients see). The API key,
    if any, is read from ``$QCRD_SERVE_API_KEY`` where the application is built (never from args: a Serve
    config file is no place for a secret).
    """
    if not args.get("model"):
        raise ValueError("serve.app:build_app needs args.model: a run directory or an HF model directory")
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [s for s in overrides.split(",") if s.strip()]
    cfg = load_config(args.get("config"), overrides)
    return build(args["model"], cfg, args.get("name"), os.environ.get(API_KEY_ENV) or None)
