"""The Serve application: request validation as pure functions, then the real service over HTTP on 127.0.0.1
with a tiny trained student (schema, parity with greedy evaluation, the official openai client, dynamic batching,
every bad-request case, overload → 503, a crashed replica replaced)."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from qcrd_ray.config import Config
from qcrd_ray.testing import free_port, patience, train_tiny_student
from serve.schemas import (
    CompletionPlan,
    CompletionRequest,
    Limits,
    PredictRequest,
    RequestError,
    apply_stop,
    check_encodable,
    completion_response,
    describe_validation_errors,
    input_params,
    interpret_output,
    plan_completion,
    plan_predict,
    served_tasks,
)

LIMITS = Limits(max_input_chars=100, max_inputs_per_request=4, max_new_tokens=32)
TASKS = served_tasks("synthetic")


# --------------------------------------------------------------------------------------------------------------
# validation without Ray


def _plan(**body):
    return plan_predict(PredictRequest.model_validate(body), LIMITS, TASKS, "synthetic")


def test_plan_predict_single_and_list():
    plan = _plan(input="Tom has 3 apples.", explain=True, temperature=0.5, max_new_tokens=8, seed=1)
    assert (plan.task, plan.texts, plan.mode, plan.temperature, plan.max_new_tokens, plan.seed, plan.is_list) == (
        "synthetic", ("Tom has 3 apples.",), "explain", 0.5, 8, 1, False)
    plan = _plan(task="svamp", input=["a", "b"])
    assert plan.texts == ("a", "b") and plan.is_list and plan.mode == "predict"
    assert plan.max_new_tokens == LIMITS.max_new_tokens  # the default is the limit


def test_plan_predict_structured_fields_are_formatted_as_the_loaders_do():
    from qcrd_ray.data import loaders

    plan = _plan(task="cqa", question="Where do plates go?", choices=["table", "cupboard", "oven"])
    assert plan.texts == (loaders.cqa_input("Where do plates go?", ["table", "cupboard", "oven"]),)
    assert plan.choices == (("table", "cupboard", "oven"),)
    plan = _plan(task="esnli", premise="A man plays.", hypothesis="A man is idle.")
    assert plan.texts == (loaders.nli_input("A man plays.", "A man is idle."),)
    # a CQA question given as formatted text keeps its choices, so "(b)" parses to the choice word
    plan = _plan(task="cqa", input=loaders.cqa_input("Where?", ["table", "cupboard"]))
    assert plan.choices == (("table", "cupboard"),)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"task": "mnist", "input": "x"}, "task", "unknown task 'mnist'"),
        ({"input": ""}, "input", "must not be empty"),
        ({"input": "   "}, "input", "must not be empty"),
        ({"input": []}, "input", "empty list"),
        ({"input": ["ok", ""]}, "input[1]", "must not be empty"),
        ({"input": "x" * 101}, "input", "101 characters is over the limit of 100"),
        ({"input": ["x"] * 5}, "input", "5 inputs in one request is over the limit of 4"),
        ({"input": "x", "max_new_tokens": 33}, "max_new_tokens", "over the limit of 32"),
        ({}, "input", "required"),
        ({"input": "x", "question": "q"}, "input", "not both"),
        ({"task": "cqa", "question": "q"}, "question", "go together"),
        ({"task": "svamp", "premise": "p", "hypothesis": "h"}, "premise", "only for anli1/esnli"),
        ({"task": "cqa", "question": "q", "choices": ["only one"]}, "choices", "2 to 26"),
    ],
)
def test_plan_predict_refuses_with_a_reason(body, param, words):
    with pytest.raises(RequestError) as err:
        _plan(**body)
    assert err.value.status == 422 and err.value.param == param and words in err.value.message


def test_plan_predict_needs_a_task_when_the_model_does_not_say():
    with pytest.raises(RequestError, match="task: required"):
        plan_predict(PredictRequest(input="x"), LIMITS, served_tasks(None), None)


@pytest.mark.parametrize(
    "body",
    [
        {"input": 42},  # numbers are not text
        {"input": ["ok", 3]},
        {"input": "x", "temperature": "hot"},
        {"input": "x", "temperature": "0.5"},  # strict: a string is not a number
        {"input": "x", "temperature": 2.5},
        {"input": "x", "temperature": -0.1},
        {"input": "x", "explain": "yes"},
        {"input": "x", "max_new_tokens": 0},
        {"input": "x", "max_new_tokens": 1.5},
        {"input": "x", "colour": "red"},  # unknown fields are refused, not ignored
    ],
)
def test_predict_request_types_are_strict(body):
    with pytest.raises(ValidationError):
        PredictRequest.model_validate(body)


def test_validation_errors_become_one_message():
    try:
        PredictRequest.model_validate({"input": "x", "temperature": 9})
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
    status, message, param = describe_validation_errors(errors)
    assert (status, param) == (422, "temperature") and message.startswith("temperature: ") and "2" in message
    assert describe_validation_errors([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                                        "ctx": {"error": "Expecting value"}}])[:2] == (
        400, "request body is not valid JSON: Expecting value")


def test_interpret_output_reads_labels_like_evaluation():
    assert interpret_output("synthetic", "predict", "( 3.0 + 4.0 )").label == "( 3.0 + 4.0 )"
    assert interpret_output("synthetic", "predict", "lots").label is None
    p = interpret_output("synthetic", "explain", "Add them. The answer is ( 3.0 + 4.0 ).")
    assert (p.rationale, p.label) == ("Add them.", "( 3.0 + 4.0 )")
    # a model writing code gets it read as text: nothing generated is executed
    assert interpret_output("synthetic", "predict", "__import__('os').system('true')").label is None
    assert interpret_output("cqa", "predict", "(b)", ("table", "cupboard")).label == "cupboard"
    assert interpret_output("esnli", "explain", "No. The answer is contradiction.").label == "contradiction"


def test_plan_completion_and_refusals():
    plan = plan_completion(CompletionRequest(model="m", prompt=["a", "b"], n=2, stop="\n", max_tokens=8), LIMITS, "m")
    assert (plan.prompts, plan.n, plan.stop, plan.max_new_tokens, plan.temperature) == (("a", "b"), 2, ("\n",), 8, 1.0)
    # no max_tokens: OpenAI's default of 16, within a server limit below it (not a 422 for a field never sent)
    assert plan_completion(CompletionRequest(prompt="a"), LIMITS, "m").max_new_tokens == 16
    assert plan_completion(CompletionRequest(prompt="a"), dataclasses.replace(LIMITS, max_new_tokens=8),
                           "m").max_new_tokens == 8
    for body, status, words in [
        ({"model": "gpt-4", "prompt": "a"}, 404, "not served here"),
        ({"prompt": "a", "stream": True, "n": 2}, 422, "n: a streamed request returns one choice"),
        ({"prompt": ["a", "b"], "stream": True}, 422, "prompt: a streamed request takes one prompt"),
        ({"prompt": "a", "echo": True}, 422, "echo: not supported"),
        ({"prompt": "a", "logprobs": 2}, 422, "logprobs: not supported"),
        ({"prompt": ["a", "b", "c"], "n": 2}, 422, "6 inputs"),
        ({"prompt": []}, 422, "empty list"),
        ({"prompt": ""}, 422, "must not be empty"),
        ({"prompt": "a", "max_tokens": 64}, 422, "max_tokens: 64 is over the limit of 32"),
        ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 422, "at most 4"),
    ]:
        with pytest.raises(RequestError) as err:
            plan_completion(CompletionRequest.model_validate(body), LIMITS, "m")
        assert err.value.status == status and words in err.value.message, body


def test_completion_response_follows_the_openai_schema():
    plan = CompletionPlan(prompts=("p",), n=3, temperature=0.0, max_new_tokens=4, stop=("|",), seed=None)
    resp = completion_response("m", plan, ["ab|cd", "abcd", "ab"], [True, True, False], prompt_tokens=[5],
                               output_tokens=[4, 3, 2])
    body = resp.model_dump()
    assert body["object"] == "text_completion" and body["model"] == "m" and body["id"].startswith("cmpl-")
    assert [(c["text"], c["index"], c["finish_reason"], c["logprobs"]) for c in body["choices"]] == [
        ("ab", 0, "stop", None), ("abcd", 1, "length", None), ("ab", 2, "stop", None)]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    assert apply_stop("a.b,c", [",", "."]) == ("a", True) and apply_stop("abc", []) == ("abc", False)


def test_a_batch_is_split_by_generation_settings():
    from serve.app import GenerationItem, batch_groups

    items = [GenerationItem("a", 0.0, 8, None, 0), GenerationItem("b", 0.7, 8, 1, 1), GenerationItem("c", 0.0, 8, 5, 2),
             GenerationItem("d", 0.7, 8, None, 3), GenerationItem("e", 0.0, 16, None, 4),
             GenerationItem("f", 0.7, 8, 1, 1), GenerationItem("g", 0.7, 8, 1, 5), GenerationItem("h", 0.7, 8, None, 6)]
    # greedy items share a call whatever their seed or request, unseeded sampled ones too; a seeded sampled request
    # gets a call of its own (its n samples together), as it would alone
    assert batch_groups(items) == {(0.0, 8, None, None): [0, 2], (0.7, 8, 1, 1): [1, 5], (0.7, 8, None, None): [3, 7],
                                   (0.0, 16, None, None): [4], (0.7, 8, 1, 5): [6]}


def test_text_that_is_not_unicode_is_refused_with_its_position():
    """A JSON-escaped lone surrogate is a 422 naming the input, before anything reaches the tokenizer."""
    for body, param in [({"input": "Tom has 5\ud800 apples."}, "input"), ({"input": ["ok", "\udfff"]}, "input[1]"),
                        ({"task": "cqa", "question": "\ud800?", "choices": ["a", "b"]}, "question")]:
        with pytest.raises(RequestError) as err:
            _plan(**body)
        assert (err.value.status, err.value.param) == (422, param) and "lone surrogate" in err.value.message
    with pytest.raises(RequestError, match="prompt\\[0\\]: not valid Unicode text: a lone surrogate U\\+D800 at "
                                           "character 2"):
        plan_completion(CompletionRequest(prompt=["ab\ud800", "c"]), LIMITS, "m")
    assert _plan(input="Mia 🍎 has 3.").texts == ("Mia 🍎 has 3.",)  # a real pair (any emoji) is fine


def test_check_encodable_names_the_input_the_tokenizer_refuses():
    def tokenize(text):
        if "\x00" in text:
            raise TypeError("cannot encode \ud800")  # a reason quoting undecodable text stays UTF-8 safe
        return [1]

    check_encodable(tokenize, ["a", "b"], input_params("input", 2, True))
    with pytest.raises(RequestError) as err:
        check_encodable(tokenize, ["a", "b\x00"], input_params("input", 2, True))
    assert (err.value.status, err.value.param) == (422, "input[1]")
    assert "tokenizer cannot encode this text (TypeError: cannot encode" in err.value.message
    err.value.message.encode("utf-8")
    assert input_params("prompt", 2, False) == ("prompt", "prompt")


def test_batch_window_takes_a_batch_when_the_clients_of_the_last_one_are_back():
    from serve.batching import BatchWindow

    w = BatchWindow(max_batch_size=16, max_wait_s=0.1)
    assert w.wait(queued=1, first_arrival=0.0, now=0.0) == 0  # nothing seen yet: a request goes at once
    # a batch of 16 finished at t=10: wait (from t=10, at most 0.1 s) until 16 are queued again
    w.finished(batch_size=16, queued=0, now=10.0)
    assert w.wait(queued=1, first_arrival=10.02, now=10.02) == pytest.approx(0.1)
    assert w.wait(queued=15, first_arrival=10.02, now=10.05) == pytest.approx(0.07)
    assert w.wait(queued=16, first_arrival=10.02, now=10.05) == 0
    assert w.wait(queued=3, first_arrival=10.02, now=10.12) == 0  # never more than max_wait_s
    # idle longer than max_wait_s before anyone came back: those clients are gone, a lone request goes at once
    assert w.wait(queued=1, first_arrival=10.5, now=10.5) == 0
    # requests queued during generation count from when the model is free, not from their arrival
    w.finished(batch_size=1, queued=15, now=20.0)
    assert w.wait(queued=15, first_arrival=19.5, now=20.0) == pytest.approx(0.1)
    # a lone client in a closed loop never waits: the estimate is what it saw, one
    w.finished(batch_size=1, queued=0, now=30.0)
    assert w.wait(queued=1, first_arrival=30.01, now=30.01) == 0
    # the estimate is capped by the batch size; a zero window takes whatever is queued
    w.finished(batch_size=16, queued=30, now=40.0)
    assert w.target(40.0) == 16
    w = BatchWindow(max_batch_size=16, max_wait_s=0.0)
    w.finished(batch_size=16, queued=0, now=0.0)
    assert w.wait(queued=1, first_arrival=0.001, now=0.001) == 0


def _closed_loop(batcher, requests_per_client):
    """Clients that each send their next item as soon as the previous one is answered."""
    import asyncio

    async def client(c, n):
        return [await batcher.submit((c, i)) for i in range(n)]

    return asyncio.gather(*(client(c, n) for c, n in enumerate(requests_per_client)))


def test_batcher_gathers_closed_loop_clients_and_never_holds_a_lone_one():
    import asyncio

    from serve.batching import Batcher

    async def scenario():
        sizes = []

        async def process(items):
            sizes.append(len(items))
            await asyncio.sleep(0.01)
            return [("done", item) for item in items]

        # 8 clients: every batch holds all 8 (the window waits for the ones just answered to come back);
        # when 4 of them stop, one window of max_wait_s passes and batches of the 4 left follow
        batcher = Batcher(process, max_batch_size=16, max_wait_s=0.2)
        answers = await _closed_loop(batcher, [3] * 4 + [6] * 4)
        assert answers[5] == [("done", (5, i)) for i in range(6)]
        assert sizes == [8, 8, 8, 4, 4, 4]

        sizes.clear()  # max_batch_size caps a batch
        await _closed_loop(Batcher(process, max_batch_size=3, max_wait_s=0.2), [2] * 6)
        assert sizes == [3, 3, 3, 3]

        sizes.clear()  # a lone client: 20 requests, none waits the 1 s window (that alone would take 20 s)
        start = asyncio.get_running_loop().time()
        await _closed_loop(Batcher(process, max_batch_size=16, max_wait_s=1.0), [20])
        assert sizes == [1] * 20 and asyncio.get_running_loop().time() - start < min(patience(5), 15)

    asyncio.run(scenario())


def test_batcher_skips_cancelled_items_and_survives_a_failing_batch():
    import asyncio

    from serve.batching import Batcher

    async def scenario():
        batches, gate = [], asyncio.Event()

        async def process(items):
            batches.append(list(items))
            await gate.wait()
            if "boom" in items:
                raise ValueError("boom")
            return [ValueError(i) if i == "bad" else i.upper() for i in items]

        batcher = Batcher(process, max_batch_size=8, max_wait_s=0.0)
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0.01)  # "a" is generating; b and c queue behind it
        gone, kept, bad = (asyncio.create_task(batcher.submit(x)) for x in ("b", "c", "bad"))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client disconnected: b is never generated
        gate.set()
        assert await first == "A" and await kept == "C"
        assert isinstance(await bad, ValueError)  # an exception result is that item's answer, as a value
        assert batches == [["a"], ["c", "bad"]]
        with pytest.raises(ValueError, match="boom"):
            await batcher.submit("boom")
        assert await batcher.submit("d") == "D"  # the queue keeps serving after a failed batch

    asyncio.run(scenario())


def test_deployment_options_come_from_the_serve_config():
    from serve.app import deployment_options

    cfg = Config().replace(serve={"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2.0,
                                  "max_ongoing_requests": 8, "max_queued_requests": 5, "num_cpus": 0.25}).serve
    assert deployment_options(cfg) == {
        "autoscaling_config": {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 3,
                               "target_ongoing_requests": 2.0},
        "max_ongoing_requests": 8,
        "max_queued_requests": 5,
        "ray_actor_options": {"num_cpus": 0.25},
    }


def test_serve_config_yaml_is_valid_for_serve_run(tmp_path):
    """serve/config.yaml passes Serve's own schema, binds to loopback, and its builder takes the documented args."""
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    raw = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    [app] = schema.applications
    assert app.import_path == "serve.app:build_app" and set(app.args) == {"model", "set"}
    with pytest.raises(FileNotFoundError, match="no model found"):
        build_app({**app.args, "model": str(tmp_path)})
    with pytest.raises(ValueError, match="needs args.model"):
        build_app({})
    (tmp_path / "config.json").write_text("{}")  # an HF model directory; bind() does not load it
    assert isinstance(build_app({"model": str(tmp_path), "set": "serve.max_batch_size=4"}), Application)


def test_qcrd_serve_refuses_a_missing_model_before_starting_ray(tmp_path, capsys):
    from qcrd_ray.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "no model found" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--port", "70000"]) == 2
    assert "serve.port" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# the service over HTTP



QUESTIONS = [
    "Tom has 5 apples. He buys 3 more.\nHow many apples does he have now?",
    "Anna packs 70 books into bags of 10.\nHow many bags does she fill?",
    "Mia has 54 marbles. A friend has 36 marbles.\nHow many more marbles does Mia have than the friend?",
    "Leo buys 4 cards every day for 6 days.\nHow many cards does he buy in total?",
]


# the run's config: evaluation decodes up to student.max_target_len tokens, the server is asked for the same
RUN_CONFIG = Config().replace(student={"max_target_len": 48}, data={"synthetic_eval_size": 6})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as training leaves it: RUN/config.yaml and RUN/model/."""
    run = tmp_path_factory.mktemp("serve") / "tiny-run"
    train_tiny_student(run / "model")
    (run / "config.yaml").write_text(RUN_CONFIG.to_yaml())
    return run


@pytest.fixture(scope="module")
def server(ray_session, request):
    from ray import serve

    from serve.app import build

    port = free_port()
    cfg = Config().replace(serve={"min_replicas": 1, "max_replicas": 1, "max_batch_size": 8,
                                  "batch_wait_timeout_s": 0.05, "max_input_chars": 500,
                                  "max_inputs_per_request": 8, "max_new_tokens": 48})
    # Serve's controller and proxy start (their own processes) while this one trains the student on one thread
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(serve.start, http_options={"host": "127.0.0.1", "port": port})
        run_dir = request.getfixturevalue("run_dir")
        started.result()
    serve.run(build(run_dir, cfg), name="qcrd-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(run_dir):
    """The evaluation path: the saved student loaded again and decoded greedily, no server involved."""
    from qcrd_ray import students as student

    model, tok = student.load_pretrained(run_dir / "model")
    return lambda texts, max_new_tokens=48, cut_off=None: student.generate(
        model, tok, texts, max_new_tokens=max_new_tokens, max_input_len=Config().student.max_input_len,
        cut_off=cut_off)


@pytest.mark.ray
def test_health_models_and_docs(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok", "model": "tiny-run"}
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-run"]
    spec = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/predict", "/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert httpx.get(f"{server}/docs").status_code == 200


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["predict", "explain"])
def test_predict_matches_qcrd_eval(server, run_dir, tmp_path, mode):
    """The server's outputs, labels and rationales equal `qcrd eval`'s predictions.jsonl on the same inputs."""
    import json

    from qcrd_ray.evaluate import evaluate

    evaluate(run_dir, RUN_CONFIG, "test", mode, out_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    resp = httpx.post(f"{server}/v1/predict", timeout=patience(60), json={
        "task": "synthetic", "input": [r["input"] for r in records], "explain": mode == "explain"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"model", "predictions"} and body["model"] == "tiny-run"
    assert [p["output"] for p in body["predictions"]] == [r["output"] for r in records]
    assert [p["label"] for p in body["predictions"]] == [r["prediction"] for r in records]
    if mode == "explain":
        assert [p["rationale"] for p in body["predictions"]] == [r["rationale"] for r in records]
        assert all(p["rationale"] for p in body["predictions"])
    else:
        assert all(p["rationale"] is None for p in body["predictions"])

    # one question, the task taken from the run's config: the documented flat schema
    resp = httpx.post(f"{server}/v1/predict", json={"input": records[0]["input"], "explain": mode == "explain"},
                      timeout=patience(60))
    one = resp.json()
    assert set(one) == {"label", "rationale", "output", "model"}
    assert {k: one[k] for k in ("label", "rationale", "output")} == body["predictions"][0]


@pytest.mark.ray
def test_openai_client_gets_completions(server, reference):
    import openai

    from qcrd_ray.data import prompts

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    prompt = [prompts.student_input("predict", q) for q in QUESTIONS[:2]]
    for max_tokens in (24, 3):  # 3: too few for any answer, so cut off
        resp = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert resp.object == "text_completion" and resp.model == "tiny-run"
        cut_off: list[bool] = []
        assert [c.text for c in resp.choices] == reference(prompt, max_new_tokens=max_tokens, cut_off=cut_off)
        # "length" exactly where the generation stopped at its budget, not where its re-encoded text is shorter
        assert [c.finish_reason for c in resp.choices] == ["length" if cut else "stop" for cut in cut_off]
        assert [c.index for c in resp.choices] == [0, 1]
    assert cut_off == [True, True]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0

    sampled = client.completions.create(model="tiny-run", prompt=prompt[0], max_tokens=8, temperature=1.0, n=3,
                                        stop=[")"])
    assert len(sampled.choices) == 3 and all(")" not in c.text for c in sampled.choices)

    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model="tiny-run", prompt="hi", temperature=5)


@pytest.mark.ray
def test_seq2seq_student_streams_chat(server, reference):
    """A seq2seq student has no chat template: the last user message is its input, a plain question asked in
    explain mode. Streamed, the content pieces add up to the non-streamed greedy answer, which is evaluation's."""
    import openai

    from qcrd_ray.data import prompts

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": QUESTIONS[0]}]
    whole = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=48, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == reference([prompts.student_input("explain", QUESTIONS[0])])[0]
    chunks = list(client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=48,
                                                 temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.ray
def test_concurrent_requests_are_batched(server, reference):
    from qcrd_ray.data import prompts

    before = httpx.get(f"{server}/v1/stats").json()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(
            lambda q: httpx.post(f"{server}/v1/predict", json={"input": q}, timeout=patience(60)), questions))
    assert [r.status_code for r in responses] == [200] * 16
    # batching must not change answers: each equals the same question decoded alone
    alone = dict(zip(QUESTIONS, reference([prompts.student_input("predict", q) for q in QUESTIONS])))
    assert [r.json()["output"] for r in responses] == [alone[q] for q in questions]
    after = httpx.get(f"{server}/v1/stats").json()
    assert after["items"] - before["items"] == 16
    new_sizes = {int(k) for k, v in after["batch_size_counts"].items() if v > before["batch_size_counts"].get(k, 0)}
    assert max(new_sizes) > 1, after  # 16 requests did not run one at a time
    assert max(new_sizes) <= after["max_batch_size"] == 8


def _post_json(url: str, body: dict) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800, as a client's JSON encoder does (httpx's own would raise)
    return httpx.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                      timeout=patience(120))


POISON = "Tom has 5 apples.\ud800 He buys 3 more.\nHow many apples does he have now?"


@pytest.mark.ray
@pytest.mark.parametrize("route", ["predict", "predict-list", "completions"])
def test_one_poisoned_request_does_not_fail_the_requests_batched_with_it(server, route):
    """12 valid requests sent together with one holding a lone surrogate: every valid one answers 200 with what
    it answers alone, the poisoned one alone gets a 422 that says why."""
    from qcrd_ray.data import prompts

    if route == "completions":
        path, answer, param = "v1/completions", lambda r: r.json()["choices"][0]["text"], "prompt"
        valid = [{"prompt": prompts.student_input("predict", q), "max_tokens": 24, "temperature": 0}
                 for q in QUESTIONS]
        poisoned = {"prompt": prompts.student_input("predict", POISON), "max_tokens": 24, "temperature": 0}
    else:
        path, answer = "v1/predict", lambda r: r.json()["output"]
        valid = [{"input": q} for q in QUESTIONS]
        poisoned = {"input": [QUESTIONS[1], POISON]} if route == "predict-list" else {"input": POISON}
        param = "input[1]" if route == "predict-list" else "input"

    alone = []
    for body in valid:
        resp = _post_json(f"{server}/{path}", body)
        assert resp.status_code == 200, resp.text
        alone.append(answer(resp))
    bodies = [valid[i % len(valid)] for i in range(12)]
    bodies.insert(6, poisoned)  # mid-burst, so it is queued among the others
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: _post_json(f"{server}/{path}", b), bodies))
    bad = responses.pop(6)
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses if r.status_code != 200]
    assert [answer(r) for r in responses] == [alone[i % len(valid)] for i in range(12)]
    assert bad.status_code == 422, bad.text
    error = bad.json()["error"]
    assert error["param"] == param and "lone surrogate U+D800" in error["message"]


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": ["a list", "not an object"]}, 422, "must be a JSON object"),
        ({"content": b"input=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 422,
         "must be a JSON object"),
        ({"json": {"input": 42}}, 422, "input"),
        ({"json": {"input": "x", "temperature": "hot"}}, 422, "temperature"),
        ({"json": {"task": "mnist", "input": "x"}}, 422, "unknown task 'mnist'"),
        ({"json": {"input": ""}}, 422, "must not be empty"),
        ({"json": {"input": "x" * 501}}, 422, "over the limit of 500"),
        ({"json": {"input": ["x"] * 9}}, 422, "9 inputs in one request is over the limit of 8"),
        ({"json": {"input": "x", "temperature": 2.5}}, 422, "temperature"),
        ({"json": {"input": "x", "temperature": -1}}, 422, "temperature"),
        ({"json": {"input": "x", "temperature": 1, "seed": 2**64}}, 422, "seed"),
        ({"json": {"input": "x", "temperature": 1, "seed": -1}}, 422, "seed"),
        ({"json": {"input": "x" * 2_000_000}}, 413, "serve.max_body_bytes (1048576 bytes)"),
    ],
)
@pytest.mark.ray
def test_bad_requests_get_a_clear_4xx(server, kwargs, status, words):
    resp = httpx.post(f"{server}/v1/predict", timeout=patience(30), **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    # the service is still up and answering
    assert httpx.post(f"{server}/v1/predict", json={"input": QUESTIONS[0]}, timeout=patience(60)).status_code == 200


@pytest.mark.ray
def test_a_route_or_method_the_server_lacks_is_refused_in_the_openai_shape(server):
    resp = httpx.post(f"{server}/v1/embeddings", json={"input": "x"}, timeout=patience(30))
    assert resp.status_code == 404 and resp.json() == {"error": {
        "message": "Invalid URL (POST /v1/embeddings)", "type": "invalid_request_error", "param": None, "code": None}}
    resp = httpx.get(f"{server}/v1/completions", timeout=patience(30))
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["error"]["message"] == "GET is not allowed on /v1/completions (it takes POST)"


@pytest.mark.ray
def test_overload_answers_503_instead_of_queueing(server, run_dir):
    """A deployment allowed 1 request in flight and 1 queued: a burst gets fast 503s, the rest succeed."""
    from ray import serve

    from serve.app import build

    tight = Config().replace(serve={"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1,
                                    "max_queued_requests": 1, "max_batch_size": 1})
    serve.run(build(run_dir, tight, name="tight"), name="tight", route_prefix="/tight")
    try:
        body = {"input": QUESTIONS[2], "explain": True, "max_new_tokens": 128}
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{server}/tight/v1/predict", json=body, timeout=patience(120))
                                  .status_code, range(12)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
        assert httpx.post(f"{server}/tight/v1/predict", json=body, timeout=patience(60)).status_code == 200
    finally:
        serve.delete("tight")


@pytest.mark.ray
def test_an_api_key_guards_every_route_but_healthz(server, run_dir):
    """With a key (only its SHA-256 reaches the replica): 401 without it or with another, 200 with it, from the
    official openai client too; /healthz stays open for probes."""
    import openai
    from ray import serve

    from serve.app import build

    cfg = Config().replace(serve={"min_replicas": 1, "max_replicas": 1, "max_new_tokens": 8})
    serve.run(build(run_dir, cfg, name="keyed", api_key="s3cret"), name="keyed", route_prefix="/keyed")
    try:
        url, body = f"{server}/keyed", {"input": QUESTIONS[0]}
        assert httpx.post(f"{url}/v1/predict", json=body, timeout=patience(60)).status_code == 401
        wrong = httpx.post(f"{url}/v1/predict", json=body, headers={"Authorization": "Bearer nope"},
                           timeout=patience(60))
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", timeout=patience(30)).status_code == 401
        assert httpx.get(f"{url}/healthz", timeout=patience(30)).json()["model"] == "keyed"
        ok = httpx.post(f"{url}/v1/predict", json=body, headers={"Authorization": "Bearer s3cret"},
                        timeout=patience(60))
        assert ok.status_code == 200, ok.text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="keyed", prompt="predict: 1 + 2", max_tokens=4).model == "keyed"
        # other apps: no key
        assert httpx.post(f"{server}/v1/predict", json=body, timeout=patience(60)).status_code == 200
    finally:
        serve.delete("keyed")


@pytest.mark.ray
def test_teacher_http_backend_can_use_this_server(server, reference):
    """The teacher's OpenAI-compatible backend pointed at the student server gets the student's completions."""
    from qcrd_ray.data import prompts
    from qcrd_ray.teacher.backends.http import HTTPBackend

    cfg = Config().replace(teacher={"backend": "http", "base_url": f"{server}/v1", "api": "completions",
                                    "model": "tiny-run", "temperature": 0.0, "max_tokens": 24, "max_retries": 0})
    rows = [{"prompt": prompts.student_input("predict", q), "seed": i} for i, q in enumerate(QUESTIONS)]
    completions = HTTPBackend(cfg).complete(rows)
    assert [c.error for c in completions] == [""] * len(rows)
    assert [c.text for c in completions] == reference([r["prompt"] for r in rows], max_new_tokens=24)


# --------------------------------------------------------------------------------------------------------------
# a model on shared storage (S3 on loopback)


@pytest.fixture(scope="module")
def s3_run(s3_server, run_dir):
    """The tiny run uploaded as training leaves it on storage: RUN/config.yaml and RUN/qcrd/model/ (with its
    completeness marker); plus the bare model at s3://bucket/serve-bare."""
    from qcrd_ray import storage

    run = f"{s3_server}/serve-run"
    storage.write_text(f"{run}/config.yaml", RUN_CONFIG.to_yaml())
    storage.upload_dir(run_dir / "model", f"{run}/qcrd/model")
    storage.upload_dir(run_dir / "model", f"{s3_server}/serve-bare")
    return run


def _incomplete_upload(s3_server, run_dir, name: str) -> str:
    """A run whose model upload stopped before its completeness marker."""
    from qcrd_ray import storage

    run = f"{s3_server}/{name}"
    storage.write_text(f"{run}/config.yaml", RUN_CONFIG.to_yaml())
    storage.upload_dir(run_dir / "model", f"{run}/qcrd/model")
    storage.delete(f"{run}/qcrd/model/{storage.COMPLETE_MARKER}")
    return run


def test_resolve_model_reads_a_run_on_storage(s3_run, s3_server, run_dir, capsys):
    from qcrd_ray.cli import main
    from qcrd_ray.runs import resolve_model

    for given in (s3_run, f"{s3_run}/qcrd", f"{s3_run}/qcrd/", f"{s3_run}/qcrd/model"):
        r = resolve_model(given)
        assert r.model_dir == f"{s3_run}/qcrd/model", given  # a URI stays a URI: replicas fetch it
        assert (r.name, r.config.data.task, r.config.train.method) == ("serve-run/qcrd", "synthetic", "qcrd")
        assert r.method.eval("test", "predict") == f"{s3_run}/qcrd/eval/test-predict"
    bare = resolve_model(f"{s3_server}/serve-bare")
    assert (bare.model_dir, bare.config, bare.name) == (f"{s3_server}/serve-bare", None, "serve-bare")
    with pytest.raises(FileNotFoundError, match="no model found"):
        resolve_model(f"{s3_server}/nothing-here")

    incomplete = _incomplete_upload(s3_server, run_dir, "serve-incomplete")
    with pytest.raises(FileNotFoundError, match="incomplete \\(no _COMPLETE.json\\): its upload is still running"):
        resolve_model(f"{incomplete}/qcrd")
    # `qcrd serve` refuses it with that line before starting Ray
    assert main(["serve", "--model", f"{incomplete}/qcrd"]) == 2
    assert "serve-incomplete/qcrd/model is incomplete" in capsys.readouterr().err


def test_fetch_model_keeps_a_local_path_and_downloads_a_uri(s3_run, run_dir, tmp_path):
    from qcrd_ray import storage
    from serve.app import fetch_model

    assert fetch_model(str(run_dir / "model")) == str(run_dir / "model")  # no copy, no marker needed
    local = fetch_model(f"{s3_run}/qcrd/model")
    assert local.startswith(str(storage.cache_dir("downloads")))
    assert sorted(p.name for p in (run_dir / "model").iterdir()) == sorted(
        p.name for p in Path(local).iterdir() if p.name != storage.COMPLETE_MARKER)


@pytest.mark.ray
def test_a_model_on_storage_is_served(server, s3_run):
    """`build` given s3://…/RUN/qcrd: the replica downloads the model into its node's cache and answers predict
    without `task` (the run's config, read from storage), exactly as the same model served from a local path."""
    from ray import serve

    from serve.app import build

    cfg = Config().replace(serve={"min_replicas": 1, "max_replicas": 1, "max_new_tokens": 48})
    serve.run(build(f"{s3_run}/qcrd", cfg), name="from-s3", route_prefix="/s3")
    try:
        remote = httpx.post(f"{server}/s3/v1/predict", json={"input": QUESTIONS[0]}, timeout=patience(60))
        assert remote.status_code == 200, remote.text
        local = httpx.post(f"{server}/v1/predict", json={"input": QUESTIONS[0]}, timeout=patience(60)).json()
        assert remote.json()["model"] == "serve-run/qcrd"
        assert {k: remote.json()[k] for k in ("label", "output")} == {k: local[k] for k in ("label", "output")}
    finally:
        serve.delete("from-s3")


@pytest.mark.ray
def test_a_replica_refuses_an_incomplete_upload(server, s3_run, s3_server, run_dir, monkeypatch):
    """The upload was restarted after the driver resolved it (its marker is gone): each replica refuses to
    load it, and the deployment fails with the reason instead of serving a half-copied model."""
    from ray import serve

    from qcrd_ray import storage
    from serve import app as serve_app
    from serve.app import build

    # Serve tries a failing constructor 3 times per replica (a new replica process each) before it gives up: one
    # refusal shows the point as well
    options = serve_app.deployment_options
    monkeypatch.setattr(serve_app, "deployment_options", lambda cfg: {**options(cfg), "max_constructor_retry_count": 1})
    run = f"{s3_server}/serve-restarted"
    storage.write_text(f"{run}/config.yaml", RUN_CONFIG.to_yaml())
    storage.upload_dir(run_dir / "model", f"{run}/qcrd/model")
    app = build(f"{run}/qcrd", Config().replace(serve={"min_replicas": 1, "max_replicas": 1}))
    storage.delete(f"{run}/qcrd/model/{storage.COMPLETE_MARKER}")
    try:
        with pytest.raises(RuntimeError, match="Deploying application restarted failed"):
            serve.run(app, name="restarted", route_prefix="/restarted")
        # the reason, as `serve status` shows it
        message = serve.status().applications["restarted"].deployments["StudentServer"].message
        assert "serve-restarted/qcrd/model is incomplete (no _COMPLETE.json)" in message, message
    finally:
        serve.delete("restarted")


@pytest.mark.ray
def test_crashed_replica_is_replaced(server):
    """Runs last: kills the only replica's actor; Serve starts a new one and requests succeed again."""
    import ray

    old = httpx.get(f"{server}/v1/stats").json()["replica"]
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::qcrd-test#StudentServer#")]
    assert name.endswith(old)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    deadline, resp = time.monotonic() + patience(120), None
    while time.monotonic() < deadline:
        try:
            resp = httpx.post(f"{server}/v1/predict", json={"input": QUESTIONS[0]}, timeout=patience(30))
            if resp.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert resp is not None and resp.status_code == 200, resp and resp.text
    assert httpx.get(f"{server}/v1/stats").json()["replica"] != old
