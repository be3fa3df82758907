"""The HTTP API's request/response schemas and validation, as plain pydantic models and pure functions.

Nothing here imports Ray or torch, so every rule a client can hit (types, limits, task names, OpenAI fields we
do not support) is tested without a server. The deployment in ``serve/app.py`` only wires these to FastAPI.

Errors follow the OpenAI error shape (``{"error": {"message", "type", "param", "code"}}``) so the official
``openai`` client surfaces our message verbatim.

Also here, for the same reason: how a chat request's messages become the student's input (:func:`plan_chat`,
:func:`student_message`), the prompt-length rule (:func:`check_prompt_lengths`), and streaming's pure parts: the
stop-sequence hold-back (:class:`StopHoldBack`) and the OpenAI chunk formats (:class:`StreamAssembler`,
:func:`sse_event`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from qcrd_ray.config import ServeConfig
from qcrd_ray.data import prompts
from qcrd_ray.data.tasks import BUILTIN_TASKS, FieldError, TaskSpec, get_task, parse_choices

MAX_TEMPERATURE = 2.0  # the OpenAI range; the student is useless well before it
MAX_STOP_SEQUENCES = 4  # as in the OpenAI API
MAX_SEED = 2**63 - 1  # torch.manual_seed's range, from 0: a larger seed would fail in generate (a 500)


class RequestError(Exception):
    """A request the service refuses: ``status`` is the HTTP code, ``param`` the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    """The OpenAI error object every refusal of the server carries, the guard's 401/413 included."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def route_error_message(method: str, path: str, status: int, detail: str, allow: str | None = None) -> str:
    """The message of a refusal by the router itself: OpenAI's wording for a route that does not exist, and the
    methods a route takes (its ``Allow`` header) for a method it does not."""
    if status == 404:
        return f"Invalid URL ({method} {path})"
    if status == 405:
        return f"{method} is not allowed on {path}" + (f" (it takes {allow})" if allow else "")
    return str(detail)


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


def check_prompt_lengths(lengths: Sequence[int], params: Sequence[str], max_input_len: int,
                         context_length: int | None = None, max_new_tokens: int = 0) -> None:
    """Refuse (422) a prompt longer than the student reads: ``student.max_input_len`` tokens (what training and
    evaluation truncate to) or, where the model's context length is known, what that leaves beside the request's
    token budget ``max_new_tokens`` (a decoder-only model's completion shares the context; 0 for a seq2seq one):
    past it a model with learned positions indexes out of its table (a 500 on CPU, a device assert that breaks the
    replica on GPU). ``lengths`` are the rendered prompts' token counts (``family.prompt_lengths``). Never
    truncated silently: a cut question is another question."""
    limit, what, fix = max_input_len, "student.max_input_len", "shorten it"
    if context_length is not None and context_length - max_new_tokens < limit:
        limit, what = max(context_length - max_new_tokens, 0), "the model's context length"
        if max_new_tokens:
            what += f" of {context_length} less the {max_new_tokens} new tokens asked for"
            fix = "shorten it or ask for fewer new tokens"
    for length, param in zip(lengths, params, strict=True):
        if length > limit:
            raise RequestError(
                422, f"{param}: the prompt is {length} tokens, over this model's limit of {limit} input tokens "
                f"({what}); {fix}", param)


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
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="sampling seed (temperature > 0)")


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


# the structured fields of the built-in tasks (PredictRequest has one attribute each), grouped as each task takes them
FIELD_GROUPS = tuple(dict.fromkeys(spec.fields for spec in BUILTIN_TASKS.values() if spec.fields))


def plan_predict(req: PredictRequest, limits: Limits, tasks: Sequence[str], default_task: str | None) -> PredictPlan:
    """Check a predict request against the limits and the known tasks; raise :class:`RequestError`."""
    task = req.task or default_task
    if task is None:
        raise RequestError(422, "task: required (this model's training task is unknown)", "task")
    if task not in tasks:
        raise RequestError(422, f"task: unknown task {task!r}; choose one of {', '.join(tasks)}", "task")
    spec = get_task(task)

    structured = {k for group in FIELD_GROUPS for k in group if getattr(req, k) is not None}
    if req.input is not None and structured:
        raise RequestError(422, f"give either input or {', '.join(sorted(structured))}, not both", "input")
    if req.input is not None:
        raw = [req.input] if isinstance(req.input, str) else list(req.input)
        if not raw:
            raise RequestError(422, "input: must not be an empty list", "input")
        _check_count(len(raw), "input", limits)
        texts = [_check_text(t, "input" if isinstance(req.input, str) else f"input[{i}]", limits)
                 for i, t in enumerate(raw)]
        choices = [tuple(parse_choices(t)) if spec.choices_in_input else () for t in texts]
    elif structured:
        if structured != set(spec.fields):  # name the group the request touched that this task does not take
            group = next(g for g in FIELD_GROUPS
                         if set(g) & structured and not (g == spec.fields and set(g) <= structured))
            owners = "/".join(t.name for t in BUILTIN_TASKS.values() if t.fields == group)
            raise RequestError(422, f"{' and '.join(group)} go together, and only for {owners}", group[0])
        values = [getattr(req, k) for k in spec.fields]
        for name, value in zip(spec.fields, values):
            if isinstance(value, str):
                _check_text(value, name, limits)
        try:
            text, choice = spec.from_fields(*values)
        except FieldError as e:
            raise RequestError(422, str(e), e.field) from None
        texts, choices = [text], [choice]
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class OpenAISampling(BaseModel):
    """The fields the OpenAI completions and chat requests share: the model, how to sample, and streaming. Every
    number is bounded (422 outside); ``n`` and the token budget also by the server's limits."""

    model_config = ConfigDict(extra="ignore")  # clients send fields like `user`, `presence_penalty`

    model: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(OpenAISampling):
    """The OpenAI completions request. The prompt is a student input: prefix it with ``predict: `` or
    ``explain: `` as the student was trained (the server renders it as the student reads it, e.g. through a
    causal student's chat template). Fields we cannot honour are refused, not silently ignored."""

    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1, description="default: OpenAI's 16, at most serve.max_new_tokens")
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
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _check_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stop) > MAX_STOP_SEQUENCES or not all(stop):
        raise RequestError(422, f"stop: give at most {MAX_STOP_SEQUENCES} non-empty sequences", "stop")
    return stop


def _check_model(model: str | None, model_name: str) -> None:
    if model is not None and model != model_name:
        raise RequestError(404, f"model: {model!r} is not served here; this server serves {model_name!r}", "model")


def _check_stream(stream: bool, n: int, prompts: int = 1) -> None:
    """Streaming sends one choice: ``n`` > 1 (or several prompts) with ``stream`` is refused rather than streamed
    one choice after another."""
    if stream and n > 1:
        raise RequestError(422, "n: a streamed request returns one choice (n=1); send n requests, or stream: false",
                           "n")
    if stream and prompts > 1:
        raise RequestError(422, "prompt: a streamed request takes one prompt; send one request per prompt, or "
                           "stream: false", "prompt")


def plan_completion(req: CompletionRequest, limits: Limits, model_name: str) -> CompletionPlan:
    _check_model(req.model, model_name)
    for name, unsupported in (("echo", bool(req.echo)),
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
    _check_stream(bool(req.stream), req.n, len(prompts) if isinstance(req.prompt, list) else 1)
    return CompletionPlan(
        prompts=tuple(prompts),
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        max_new_tokens=_check_max_new_tokens(req.max_tokens, "max_tokens", limits, 16),
        stop=_check_stop(req.stop),
        seed=req.seed,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop sequence; (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def finish_output(text: str, cut_off: bool, stop: Sequence[str]) -> tuple[str, str]:
    """A generated (stripped) text → (the text cut at its first stop sequence, OpenAI's finish_reason): "stop" at a
    stop sequence or the model's end of sequence, "length" when the generation was cut off at its token budget
    (``cut_off``, as ``family.generate`` / ``family.stream`` report it)."""
    text, stopped = apply_stop(text, stop)
    return text, finish_reason(stopped, cut_off)


def finish_reason(stopped: bool, cut_off: bool) -> str:
    """OpenAI's finish_reason: "stop" at a stop sequence or the model's end of sequence, "length" when the
    generation was cut off at its token budget."""
    return "stop" if stopped or not cut_off else "length"


def completion_response(
    model_name: str,
    plan: CompletionPlan,
    outputs: Sequence[str],
    cut_off: Sequence[bool],
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
) -> CompletionResponse:
    """Assemble the OpenAI response. ``outputs`` / ``cut_off`` / ``output_tokens`` hold ``n`` entries per prompt,
    prompt-major (choice index = prompt index * n + sample index, as OpenAI numbers them)."""
    choices, completion_tokens = [], 0
    for index, (text, cut, tokens) in enumerate(zip(outputs, cut_off, output_tokens, strict=True)):
        text, finish = finish_output(text, cut, plan.stop)
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
# POST /v1/chat/completions (OpenAI-compatible)

CHAT_ROLES = ("system", "developer", "user", "assistant")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send `name` and the like

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None


class ChatCompletionRequest(OpenAISampling):
    """The OpenAI chat completions request.

    The messages are rendered as the student reads them: through its tokenizer's chat template where it has one,
    else the last user message alone is the student's input. Each user message is a student input: one that
    starts with ``predict: `` or ``explain: `` is kept as it is; any other text is a question, asked in explain
    mode (``explain: `` is put in front), so the student writes its rationale, then ``The answer is …``. Fields we
    cannot honour (tools, logprobs, response formats other than text) are refused, not silently ignored."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default and upper bound: serve.max_new_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    response_format: dict | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


@dataclass(frozen=True)
class ChatPlan:
    messages: tuple[dict, ...]  # {"role", "content"}: user messages as student inputs (see student_message)
    n: int
    temperature: float
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool = False
    include_usage: bool = False


STUDENT_PREFIXES = (prompts.PREDICT, prompts.EXPLAIN)


def student_message(text: str) -> str:
    """A user message → the student input it stands for: ``predict: x`` / ``explain: x`` as written (the prefix
    chooses the mode, as in training); anything else is the question ``x`` asked in explain mode (``explain: x``),
    so a plain question gets the student's rationale and then its answer. Surrounding whitespace is dropped."""
    text = text.strip()
    return text if text.startswith(STUDENT_PREFIXES) else prompts.student_input("explain", text)


def _message_text(message: ChatMessage, param: str) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise RequestError(422, f"{param}[{j}]: only text content parts are supported (got {part.type!r})",
                               f"{param}[{j}]")
        texts.append(part.text)
    return "\n".join(texts)


def plan_chat(req: ChatCompletionRequest, limits: Limits, model_name: str) -> ChatPlan:
    """Check a chat request; its user messages become student inputs (:func:`student_message`)."""
    _check_model(req.model, model_name)
    for name, unsupported in (
        ("logprobs", bool(req.logprobs)), ("top_logprobs", req.top_logprobs is not None),
        ("tools", bool(req.tools)), ("tool_choice", req.tool_choice not in (None, "none")),
        ("functions", bool(req.functions)), ("function_call", req.function_call not in (None, "none")),
        ("response_format", req.response_format not in (None, {"type": "text"})),
    ):
        if unsupported:
            raise RequestError(422, f"{name}: not supported by this server", name)
    if not req.messages:
        raise RequestError(422, "messages: must not be empty", "messages")
    messages, total = [], 0
    for i, m in enumerate(req.messages):
        param = f"messages[{i}]"
        if m.role not in CHAT_ROLES:
            raise RequestError(422, f"{param}.role: {m.role!r} is not supported; use one of "
                               f"{', '.join(CHAT_ROLES)} (no tools)", f"{param}.role")
        if m.tool_calls:
            raise RequestError(422, f"{param}.tool_calls: not supported by this server", f"{param}.tool_calls")
        text = _message_text(m, f"{param}.content")
        if m.role == "user":
            _check_text(text, f"{param}.content", limits)
            text = student_message(text)
        elif text:
            _check_text(text, f"{param}.content", limits)
        total += len(text)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if messages[-1]["role"] != "user":
        raise RequestError(422, "messages: the last message must be a user message (the student answers it)",
                           "messages")
    if total > limits.max_input_chars:
        raise RequestError(422, f"messages: {total} characters in all is over the limit of {limits.max_input_chars}",
                           "messages")
    _check_count(req.n, "n", limits)
    _check_stream(bool(req.stream), req.n)
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise RequestError(422, "max_completion_tokens: give it or max_tokens, not two different values",
                           "max_completion_tokens")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return ChatPlan(
        messages=tuple(messages),
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        max_new_tokens=_check_max_new_tokens(req.max_completion_tokens or req.max_tokens, param, limits,
                                             limits.max_new_tokens),
        stop=_check_stop(req.stop),
        seed=req.seed,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )


def chat_response(model_name: str, plan: ChatPlan, outputs: Sequence[str], cut_off: Sequence[bool],
                  prompt_tokens: int, output_tokens: Sequence[int]) -> ChatCompletionResponse:
    """Assemble the OpenAI chat response: one choice per sample (``n``)."""
    choices = []
    for index, (text, cut) in enumerate(zip(outputs, cut_off, strict=True)):
        text, finish = finish_output(text, cut, plan.stop)
        choices.append(ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=finish))
    completion_tokens = sum(output_tokens)
    return ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model_name,
        choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
    )


# --------------------------------------------------------------------------------------------------------------
# streaming (server-sent events in OpenAI's chunk format)


class StopHoldBack:
    """The text of a streamed output that is safe to send, piece by piece, so that the pieces sent add up to
    exactly what the non-streamed response holds: ``apply_stop(output.strip(), stop)``.

    Held back: leading whitespace, trailing whitespace (sent once more text follows it; dropped at the end), and
    any tail that could still be the start of a stop sequence (or the start of an earlier one: with stops
    ``["abcd", "b"]`` the ``b`` of ``xab`` ends the text only once ``abcd`` is ruled out). :attr:`stopped` turns
    true at a stop sequence: the rest of the generation is not needed."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.raw = ""  # every piece fed, as generated
        self.sent = 0  # characters of the stripped text sent so far
        self.stopped = False

    def _limit(self, text: str, final: bool) -> tuple[int, bool]:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        cut = min(cuts) if cuts else None
        if final:
            return (len(text), False) if cut is None else (cut, True)
        # the earliest position whose tail is a proper prefix of some stop sequence: it may still become one
        hold = min((len(text) - k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=None)
        if cut is not None and (hold is None or cut <= hold):
            return cut, True
        return min(x for x in (cut, hold, len(text)) if x is not None), False

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.raw.strip()
        limit, self.stopped = self._limit(text, final)
        out = text[self.sent:limit]
        self.sent = max(self.sent, limit)
        return out

    def feed(self, piece: str) -> str:
        """Add a generated piece; the text now safe to send ("" while it is held back)."""
        if self.stopped:
            return ""
        self.raw += piece
        return self._advance(final=False)

    def finish(self) -> str:
        """The generation ended: whatever was held back and belongs to the output."""
        return self._advance(final=True)


def completion_chunk(cid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     index: int = 0) -> dict:
    """A streamed ``text_completion`` chunk (OpenAI's format: the same object as the response, one piece of text)."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               index: int = 0) -> dict:
    """A ``chat.completion.chunk``: ``delta`` is ``{"role": "assistant", "content": ""}`` first, then
    ``{"content": piece}``, and ``{}`` in the last chunk, which carries the finish_reason."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(cid: str, created: int, model: str, obj: str, usage: Usage) -> dict:
    """The last chunk under ``stream_options.include_usage``: no choices, the request's usage."""
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage.model_dump()}


def sse_event(payload: dict) -> str:
    """One server-sent event (``data: <json>`` and a blank line)."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # the stream's last event, as OpenAI ends one


class StreamAssembler:
    """A streamed response's chunks, as pure state: :meth:`start` (chat: the role chunk), :meth:`feed` per generated
    piece, :meth:`finish` at the end (the held-back text, the finish_reason chunk, the usage chunk when asked).
    Stop sequences apply as in the non-streamed response (:class:`StopHoldBack`); :attr:`stopped` says the
    generation may be abandoned."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, stop: Sequence[str], prompt_tokens: int,
                 include_usage: bool = False, created: int | None = None):
        self.kind = kind
        self.model = model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time()) if created is None else created
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.holdback = StopHoldBack(stop)

    @property
    def stopped(self) -> bool:
        return self.holdback.stopped

    def _piece(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.kind == "chat":
            return [chat_chunk(self.id, self.created, self.model, {"content": text})]
        return [completion_chunk(self.id, self.created, self.model, text)]

    def start(self) -> list[dict]:
        if self.kind == "chat":
            return [chat_chunk(self.id, self.created, self.model, {"role": "assistant", "content": ""})]
        return []

    def feed(self, piece: str) -> list[dict]:
        return self._piece(self.holdback.feed(piece))

    def finish(self, count_tokens: Callable[[str], int], cut_off: bool) -> list[dict]:
        """The last chunks; ``cut_off``: whether the generation stopped at its token budget (the finish_reason);
        ``count_tokens`` counts the output's tokens for the usage (from its text, as the non-streamed response
        does)."""
        chunks = self._piece(self.holdback.finish())
        tokens = count_tokens(self.holdback.raw.strip())
        finish = finish_reason(self.holdback.stopped, cut_off)
        if self.kind == "chat":
            chunks.append(chat_chunk(self.id, self.created, self.model, {}, finish))
        else:
            chunks.append(completion_chunk(self.id, self.created, self.model, "", finish))
        if self.include_usage:
            usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=tokens,
                          total_tokens=self.prompt_tokens + tokens)
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            chunks.append(usage_chunk(self.id, self.created, self.model, obj, usage))
        return chunks


# --------------------------------------------------------------------------------------------------------------
# GET /v1/models


def models_response(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "qcrd"}]}


def served_tasks(train_task: str | None) -> tuple[str, ...]:
    """The tasks a request may name: the built-in ones (the task registry) plus the (possibly user-defined) training
    task."""
    builtin = tuple(BUILTIN_TASKS)
    return builtin + ((train_task,) if train_task and train_task not in builtin else ())
