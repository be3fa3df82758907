"""The HTTP API's request/response schemas and validation, as plain pydantic models and pure functions.

Nothing here imports Ray or torch, so every rule a client can hit (types, limits, task names, OpenAI fields we
do not support) is tested without a server. The deployment in ``serve/app.py`` only wires these to FastAPI.

Errors follow the OpenAI error shape (``{"error": {"message", "type", "param", "code"}}``) so the official
``openai`` client surfaces our message verbatim.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from qcrd_ray.config import TASKS, ServeConfig
from qcrd_ray.data.tasks import TaskSpec

MAX_TEMPERATURE = 2.0  # the OpenAI range; the student is useless well before it
MAX_STOP_SEQUENCES = 4  # as in the OpenAI API


class RequestError(Exception):
    """A request the service refuses: ``status`` is the HTTP code, ``param`` the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def describe_validation_errors(errors: Sequence[dict]) -> tuple[int, str, str | None]:
    """FastAPI/pydantic validation errors → (status, one readable message, the first offending field).

    A body that is not JSON is a 400 (malformed request); a well-formed body with wrong fields is a 422.
    """
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"request body is not valid JSON{': ' + str(detail) if detail else ''}", None
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return 422, "request body must be a JSON object (Content-Type: application/json)", None
    parts, first = [], None
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        # pydantic names the member of a union it tried ("str", "list[str]"); the client only needs the field
        loc = [p for p in loc if not re.fullmatch(r"[a-z]+\[.*\]|str|int|float|bool", p)]
        where = ".".join(loc) or "body"
        first = first or where
        parts.append(f"{where}: {e.get('msg', 'invalid value')}")
    unique = list(dict.fromkeys(parts))
    return 422, "; ".join(unique) or "invalid request", first


# --------------------------------------------------------------------------------------------------------------
# limits


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; from ``ServeConfig``."""

    max_input_chars: int
    max_inputs_per_request: int
    max_new_tokens: int

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "Limits":
        return cls(cfg.max_input_chars, cfg.max_inputs_per_request, cfg.max_new_tokens)


# JSON may escape half of a UTF-16 pair (`"\ud800"`); such a string is not Unicode text and no tokenizer encodes it
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str, param: str, limits: Limits) -> str:
    if not text.strip():
        raise RequestError(422, f"{param}: must not be empty", param)
    if len(text) > limits.max_input_chars:
        raise RequestError(
            422, f"{param}: {len(text)} characters is over the limit of {limits.max_input_chars}", param
        )
    bad = _SURROGATE.search(text)
    if bad:
        raise RequestError(
            422, f"{param}: not valid Unicode text: a lone surrogate U+{ord(bad.group()):04X} at character "
            f"{bad.start()} (send UTF-8 text; a JSON \\u escape must encode a whole character)", param,
        )
    return text


def input_params(name: str, count: int, is_list: bool) -> tuple[str, ...]:
    """How errors name each input of a request: ``input`` for a single one, ``input[i]`` in a list."""
    return tuple(f"{name}[{i}]" for i in range(count)) if is_list else (name,) * count


def check_encodable(tokenize: Callable[[str], object], texts: Sequence[str], params: Sequence[str]) -> None:
    """Refuse (422) a text the model's tokenizer cannot encode before it is queued: inside a batch it would fail
    the ``generate`` call of every request batched with it."""
    for text, param in zip(texts, params, strict=True):
        try:
            tokenize(text)
        except Exception as e:
            # the reason may quote the text; keep the response encodable as UTF-8
            reason = f"{type(e).__name__}: {e}".encode("utf-8", "backslashreplace").decode("utf-8")
            raise RequestError(422, f"{param}: the model's tokenizer cannot encode this text ({reason})",
                               param) from e


def _check_count(count: int, param: str, limits: Limits) -> None:
    if count > limits.max_inputs_per_request:
        raise RequestError(
            422, f"{param}: {count} inputs in one request is over the limit of {limits.max_inputs_per_request}",
            param,
        )


def _check_max_new_tokens(value: int | None, param: str, limits: Limits, default: int) -> int:
    if value is None:
        return min(default, limits.max_new_tokens)
    if value > limits.max_new_tokens:
        raise RequestError(422, f"{param}: {value} is over the limit of {limits.max_new_tokens}", param)
    return value


# --------------------------------------------------------------------------------------------------------------
# POST /v1/predict


class PredictRequest(BaseModel):
    """Ask the student for a label (and with ``explain``, a rationale).

    Give the question either as ``input`` (one string, or a list of strings answered in one request) formatted
    as the task's data is (CQA: question + ``Answer Choices: (a) … (e) …``; NLI: ``premise: … hypothesis: …``),
    or as the task's structured fields: ``question`` + ``choices`` (cqa) or ``premise`` + ``hypothesis``
    (anli1, esnli).
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    task: str | None = Field(None, description="task name; defaults to the task the model was trained on")
    input: str | list[str] | None = Field(None, description="the question as the task's data writes it")
    question: str | None = Field(None, description="cqa: the question (with `choices`)")
    choices: list[str] | None = Field(None, description="cqa: the answer choices, in order (a), (b), ...")
    premise: str | None = Field(None, description="anli1/esnli: the premise (with `hypothesis`)")
    hypothesis: str | None = Field(None, description="anli1/esnli: the hypothesis (with `premise`)")
    explain: bool = Field(False, description="also generate a rationale (the student's explain mode)")
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, description="0 = greedy (as in evaluation)")
    max_new_tokens: int | None = Field(None, ge=1, description="default and upper bound: serve.max_new_tokens")
    seed: int | None = Field(None, description="sampling seed (temperature > 0)")


class Prediction(BaseModel):
    label: str | None = Field(description="the parsed answer; null when the output holds no valid answer")
    rationale: str | None = Field(description="the generated rationale (explain mode), else null")
    output: str = Field(description="the raw generated text")


class PredictResponse(Prediction):
    model: str


class PredictBatchResponse(BaseModel):
    model: str
    predictions: list[Prediction]


@dataclass(frozen=True)
class PredictPlan:
    """A validated predict request: the task, the question texts (as the data formats them), their choices
    (for parsing the answer), the generation settings and whether the client sent a list."""

    task: str
    texts: tuple[str, ...]
    choices: tuple[tuple[str, ...], ...]
    mode: str  # "predict" | "explain"
    temperature: float
    max_new_tokens: int
    seed: int | None
    is_list: bool


def plan_predict(req: PredictRequest, limits: Limits, tasks: Sequence[str], default_task: str | None) -> PredictPlan:
    """Check a predict request against the limits and the known tasks; raise :class:`RequestError`."""
    from qcrd_ray.data import loaders

    task = req.task or default_task
    if task is None:
        raise RequestError(422, "task: required (this model's training task is unknown)", "task")
    if task not in tasks:
        raise RequestError(422, f"task: unknown task {task!r}; choose one of {', '.join(tasks)}", "task")

    structured = {k for k in ("question", "choices", "premise", "hypothesis") if getattr(req, k) is not None}
    if req.input is not None and structured:
        raise RequestError(422, f"give either input or {', '.join(sorted(structured))}, not both", "input")
    if req.input is not None:
        raw = [req.input] if isinstance(req.input, str) else list(req.input)
        if not raw:
            raise RequestError(422, "input: must not be an empty list", "input")
        _check_count(len(raw), "input", limits)
        texts = [_check_text(t, "input" if isinstance(req.input, str) else f"input[{i}]", limits)
                 for i, t in enumerate(raw)]
        choices = [tuple(loaders.parse_choices(t)) if task == "cqa" else () for t in texts]
    elif {"premise", "hypothesis"} & structured:
        if task not in ("anli1", "esnli") or structured != {"premise", "hypothesis"}:
            raise RequestError(422, "premise and hypothesis go together, and only for anli1/esnli", "premise")
        _check_text(req.premise, "premise", limits)
        _check_text(req.hypothesis, "hypothesis", limits)
        texts, choices = [loaders.nli_input(req.premise, req.hypothesis)], [()]
    elif structured:
        if task != "cqa" or structured != {"question", "choices"}:
            raise RequestError(422, "question and choices go together, and only for cqa", "question")
        _check_text(req.question, "question", limits)
        if not 2 <= len(req.choices) <= 26 or not all(c.strip() for c in req.choices):
            raise RequestError(422, "choices: give 2 to 26 non-empty choices", "choices")
        texts, choices = [loaders.cqa_input(req.question, req.choices)], [tuple(req.choices)]
    else:
        raise RequestError(422, "input: required (or the task's structured fields)", "input")
    for i, text in enumerate(texts):  # the formatted text must fit too
        _check_text(text, "input" if len(texts) == 1 else f"input[{i}]", limits)

    return PredictPlan(
        task=task,
        texts=tuple(texts),
        choices=tuple(choices),
        mode="explain" if req.explain else "predict",
        temperature=req.temperature,
        max_new_tokens=_check_max_new_tokens(req.max_new_tokens, "max_new_tokens", limits, limits.max_new_tokens),
        seed=req.seed,
        is_list=isinstance(req.input, list),
    )


def interpret_output(task: str | TaskSpec, mode: str, output: str, choices: Sequence[str] = ()) -> Prediction:
    """A generated text → label (+ rationale in explain mode), read exactly as ``qcrd eval`` reads it. Text only:
    nothing the model writes is ever executed (numeric answers are read by the AST-walking ``safe_eval``)."""
    from qcrd_ray.evaluate import score_output

    scored = score_output(task, mode, output, gold=None, choices=choices)
    return Prediction(label=scored["prediction"], rationale=scored["rationale"] if mode == "explain" else None,
                      output=output)


# --------------------------------------------------------------------------------------------------------------
# POST /v1/completions (OpenAI-compatible)


class CompletionRequest(BaseModel):
    """The OpenAI completions request. The prompt goes to the student verbatim (prefix it with ``predict: `` or
    ``explain: `` as the student was trained). Fields we cannot honour are refused, not silently ignored."""

    model_config = ConfigDict(extra="ignore")  # clients send fields like `user`, `presence_penalty`

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    finish_reason: str
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


@dataclass(frozen=True)
class CompletionPlan:
    prompts: tuple[str, ...]
    n: int
    temperature: float
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int | None


def plan_completion(req: CompletionRequest, limits: Limits, model_name: str) -> CompletionPlan:
    if req.model is not None and req.model != model_name:
        raise RequestError(404, f"model: {req.model!r} is not served here; this server serves {model_name!r}", "model")
    for name, unsupported in (("stream", bool(req.stream)), ("echo", bool(req.echo)),
                              ("logprobs", req.logprobs is not None), ("suffix", req.suffix is not None),
                              ("best_of", req.best_of not in (None, 1))):
        if unsupported:
            raise RequestError(422, f"{name}: not supported by this server", name)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise RequestError(422, "prompt: must not be an empty list", "prompt")
    _check_count(len(prompts) * req.n, "prompt", limits)  # n samples of each prompt are generated
    for i, p in enumerate(prompts):
        _check_text(p, "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]", limits)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_SEQUENCES or not all(stop):
        raise RequestError(422, f"stop: give at most {MAX_STOP_SEQUENCES} non-empty sequences", "stop")
    return CompletionPlan(
        prompts=tuple(prompts),
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        max_new_tokens=_check_max_new_tokens(req.max_tokens, "max_tokens", limits, 16),
        stop=stop,
        seed=req.seed,
    )


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop sequence; (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def completion_response(
    model_name: str,
    plan: CompletionPlan,
    outputs: Sequence[str],
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
) -> CompletionResponse:
    """Assemble the OpenAI response. ``outputs`` / ``output_tokens`` hold ``n`` entries per prompt, prompt-major
    (choice index = prompt index * n + sample index, as OpenAI numbers them)."""
    choices, completion_tokens = [], 0
    for index, (text, tokens) in enumerate(zip(outputs, output_tokens)):
        text, stopped = apply_stop(text, plan.stop)
        # without a stop sequence, a generation that used the whole token budget was cut short
        finish = "stop" if stopped or tokens < plan.max_new_tokens else "length"
        choices.append(CompletionChoice(text=text, index=index, finish_reason=finish))
        completion_tokens += tokens
    prompt_total = sum(prompt_tokens)
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model_name,
        choices=choices,
        usage=Usage(prompt_tokens=prompt_total, completion_tokens=completion_tokens,
                    total_tokens=prompt_total + completion_tokens),
    )


# --------------------------------------------------------------------------------------------------------------
# GET /v1/models


def models_response(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "qcrd"}]}


def served_tasks(train_task: str | None) -> tuple[str, ...]:
    """The tasks a request may name: the built-in ones plus the (possibly user-defined) training task."""
    return TASKS + ((train_task,) if train_task and train_task not in TASKS else ())
