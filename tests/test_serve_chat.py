"""Chat completions, streaming and the prompt-length rule: the pure parts (serve/schemas.py) without Ray, the
vLLM engine's config as data (serve/vllm.py, without vLLM), then the service over HTTP with a tiny causal
(decoder-only, chat-templated) student through the official openai client. The seq2seq student's chat streaming
is tested in tests/test_serve.py, on that module's server."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest

from qcrd_ray.config import Config
from qcrd_ray.testing import TINY_CHAT_TEMPLATE, patience, train_tiny_student
from serve.schemas import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatPlan,
    Limits,
    RequestError,
    StopHoldBack,
    StreamAssembler,
    apply_stop,
    chat_response,
    check_prompt_lengths,
    plan_chat,
    sse_event,
    student_message,
)
from qcrd_ray.testing import free_port

LIMITS = Limits(max_input_chars=100, max_inputs_per_request=4, max_new_tokens=32)


# --------------------------------------------------------------------------------------------------------------
# chat requests without Ray


def _chat(**body):
    body.setdefault("messages", [{"role": "user", "content": "Tom has 3 apples."}])
    return plan_chat(ChatCompletionRequest.model_validate(body), LIMITS, "m")


def test_a_plain_question_is_asked_in_explain_mode():
    assert student_message("Tom has 3 apples.") == "explain: Tom has 3 apples."
    assert student_message("  predict: Tom has 3 apples.\n") == "predict: Tom has 3 apples."
    assert student_message("explain: x") == "explain: x"
    assert student_message("Predict: x") == "explain: Predict: x"  # the prefixes are the trained ones, exactly


def test_plan_chat_turns_user_messages_into_student_inputs():
    plan = _chat(model="m", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Tom has 3 apples."},
                                     {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "predict: Mia has 2."},
    ], temperature=0, stop="\n", seed=3, n=2)
    assert plan.messages == ({"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "explain: Tom has 3 apples.\nHow many?"},
                             {"role": "assistant", "content": "3"},
                             {"role": "user", "content": "predict: Mia has 2."})
    assert (plan.n, plan.temperature, plan.stop, plan.seed, plan.stream) == (2, 0.0, ("\n",), 3, False)
    assert plan.max_new_tokens == LIMITS.max_new_tokens  # chat's default: the serve limit (room for a rationale)
    assert _chat(max_tokens=8).max_new_tokens == 8 and _chat(max_completion_tokens=9).max_new_tokens == 9
    assert _chat(max_tokens=7, max_completion_tokens=7).max_new_tokens == 7
    streamed = _chat(stream=True, stream_options={"include_usage": True})
    assert streamed.stream and streamed.include_usage
    assert not _chat(stream_options={"include_usage": True}).include_usage  # usage chunks are for streams


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"model": "gpt-4"}, 404, "model", "not served here"),
        ({"messages": []}, 422, "messages", "must not be empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 422, "messages[0].role", "'tool' is not supported"),
        ({"messages": [{"role": "user", "content": ""}]}, 422, "messages[0].content", "must not be empty"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, 422, "messages[0].content", "over the limit of 100"),
        ({"messages": [{"role": "system", "content": "x" * 60}, {"role": "user", "content": "y" * 60}]}, 422,
         "messages", "characters in all is over the limit of 100"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, 422, "messages",
         "last message must be a user message"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422,
         "messages[0].content[0]", "only text content parts"),
        ({"messages": [{"role": "user", "content": "a\ud800"}]}, 422, "messages[0].content", "lone surrogate"),
        ({"n": 5}, 422, "n", "5 inputs in one request is over the limit of 4"),
        ({"stream": True, "n": 2}, 422, "n", "a streamed request returns one choice"),
        ({"max_tokens": 64}, 422, "max_tokens", "64 is over the limit of 32"),
        ({"max_completion_tokens": 64}, 422, "max_completion_tokens", "64 is over the limit of 32"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, 422, "max_completion_tokens", "not two different values"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "at most 4"),
        ({"logprobs": True}, 422, "logprobs", "not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, 422, "response_format", "not supported"),
    ],
)
def test_plan_chat_refuses_with_a_reason(body, status, param, words):
    with pytest.raises(RequestError) as err:
        _chat(**body)
    assert (err.value.status, err.value.param) == (status, param) and words in err.value.message, err.value.message


def test_chat_response_follows_the_openai_schema():
    plan = ChatPlan(messages=({"role": "user", "content": "explain: q"},), n=2, temperature=0.5, max_new_tokens=4,
                    stop=("|",), seed=None)
    body = chat_response("m", plan, ["ab|cd", "abcd"], [True, True], prompt_tokens=5, output_tokens=[3, 4]).model_dump()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "m"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "ab"}, "finish_reason": "stop", "logprobs": None},
        {"index": 1, "message": {"role": "assistant", "content": "abcd"}, "finish_reason": "length", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_check_prompt_lengths_names_the_param_and_both_lengths():
    check_prompt_lengths([10, 64], ["prompt[0]", "prompt[1]"], max_input_len=64, context_length=512)
    with pytest.raises(RequestError) as err:
        check_prompt_lengths([10, 65], ["prompt[0]", "prompt[1]"], max_input_len=64, context_length=None)
    assert (err.value.status, err.value.param) == (422, "prompt[1]")
    assert ("the prompt is 65 tokens, over this model's limit of 64 input tokens (student.max_input_len)"
            in err.value.message)
    with pytest.raises(RequestError, match="limit of 32 input tokens \\(the model's context length\\)"):
        check_prompt_lengths([40], ["messages"], max_input_len=64, context_length=32)


def test_a_decoder_only_prompt_leaves_the_context_its_completion_needs():
    """A causal model's completion takes positions of the same context: a prompt that fits max_input_len but not
    beside the request's token budget is refused, not run past the position table (a CUDA assert on GPU)."""
    from qcrd_ray.students import FAMILIES

    assert FAMILIES["causal"].completion_in_context and not FAMILIES["seq2seq"].completion_in_context
    check_prompt_lengths([400], ["prompt"], max_input_len=500, context_length=512, max_new_tokens=112)
    with pytest.raises(RequestError) as err:
        check_prompt_lengths([401], ["prompt"], max_input_len=500, context_length=512, max_new_tokens=112)
    assert err.value.param == "prompt" and err.value.message == (
        "prompt: the prompt is 401 tokens, over this model's limit of 400 input tokens (the model's context length "
        "of 512 less the 112 new tokens asked for); shorten it or ask for fewer new tokens")
    # max_input_len stays the limit where the context leaves more
    with pytest.raises(RequestError, match="limit of 64 input tokens \\(student.max_input_len\\)"):
        check_prompt_lengths([65], ["prompt"], max_input_len=64, context_length=512, max_new_tokens=112)


# --------------------------------------------------------------------------------------------------------------
# streaming's pure parts


def _streamed(pieces, stop):
    hold = StopHoldBack(stop)
    sent = []
    for piece in pieces:
        sent.append(hold.feed(piece))
        if hold.stopped:
            break
    sent.append(hold.finish())
    return "".join(sent), hold.stopped


@pytest.mark.parametrize(
    "pieces, stop, expected",
    [
        (["  Add", " them", ". The", " answer", " is 7.", " \n"], [], "Add them. The answer is 7."),
        (["Add them", ". The ans", "wer is 7."], [" The answer"], "Add them."),
        (["a\n", "b"], ["\n"], "a"),
        (["a", "\n"], ["\n"], "a"),  # a trailing newline is stripped from the output: it stops nothing
        (["xa", "b", "cd"], ["abcd", "b"], "x"),  # the earlier stop wins though the later one completed first
        (["xa", "b", "ce"], ["abcd", "b"], "xa"),
        (["The ans", "wer"], ["answer is"], "The answer"),  # a prefix held back, then sent when ruled out
    ],
)
def test_stop_hold_back_sends_exactly_the_non_streamed_text(pieces, stop, expected):
    text, _ = _streamed(pieces, stop)
    assert text == expected == apply_stop("".join(pieces).strip(), stop)[0]


def test_stop_hold_back_matches_apply_stop_on_random_splits():
    rng = random.Random(0)
    alphabet = "ab \n."
    for _ in range(3000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 3))]
        cuts = sorted(rng.sample(range(len(raw) + 1), rng.randint(0, len(raw))))
        pieces = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)])]
        text, stopped = _streamed(pieces, stop)
        assert (text, stopped) == apply_stop(raw.strip(), stop), (pieces, stop)


def test_stream_assembler_writes_openai_chunks():
    chat = StreamAssembler("chat", "m", stop=["|"], prompt_tokens=5, include_usage=True, created=1)
    chunks = chat.start() + chat.feed(" Add") + chat.feed(" it|x")
    assert chat.stopped
    chunks += chat.finish(lambda text: len(text.split()), cut_off=True)  # a stop sequence met: "stop"
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 5
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert [c["choices"][0]["delta"] for c in chunks[:4]] == [
        {"role": "assistant", "content": ""}, {"content": "Add"}, {"content": " it"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "stop"]
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                                                 "total_tokens": 7}

    text = StreamAssembler("completion", "m", stop=[], prompt_tokens=3)
    chunks = text.start() + text.feed("a b") + text.feed(" c") + text.finish(lambda t: len(t.split()), cut_off=True)
    assert [(c["object"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        ("text_completion", "a b", None), ("text_completion", " c", None), ("text_completion", "", "length")]
    assert chunks[0]["id"].startswith("cmpl-") and chunks[0]["choices"][0]["logprobs"] is None

    assert sse_event({"a": "é"}) == 'data: {"a": "é"}\n\n' and SSE_DONE == "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------------------------
# the vLLM engine's config, as data (vLLM is not installed here: nothing is deployed)


def _fake_model(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_vllm_llm_config_for_a_merged_model_and_for_lora():
    from serve import vllm

    serve_cfg = Config().replace(serve={"min_replicas": 0, "max_replicas": 3, "max_new_tokens": 64}).serve
    target = vllm.VllmTarget("run/qcrd", "s3://bucket/run/qcrd/model", max_model_len=320)
    assert vllm.llm_config(target, serve_cfg, accelerator_type="H100") == {
        "model_loading_config": {"model_id": "run/qcrd", "model_source": "s3://bucket/run/qcrd/model"},
        "engine_kwargs": {"max_model_len": 320},
        "deployment_config": {
            "autoscaling_config": {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 3,
                                   "target_ongoing_requests": serve_cfg.target_ongoing_requests},
            "max_ongoing_requests": serve_cfg.max_ongoing_requests,
            "max_queued_requests": serve_cfg.max_queued_requests,
        },
        "accelerator_type": "H100",
    }
    lora = vllm.VllmTarget("run/qcrd", "Qwen/Qwen2.5-0.5B-Instruct", 320, lora_root="s3://bucket/run/qcrd",
                           lora_name="adapter", lora_rank=4)
    config = vllm.llm_config(lora, serve_cfg, max_adapters=2)
    assert config["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/run/qcrd",
                                     "max_num_adapters_per_replica": 2}
    assert config["engine_kwargs"] == {"max_model_len": 320, "enable_lora": True, "max_lora_rank": 8, "max_loras": 2}
    assert lora.lora_model == "run/qcrd:adapter" and vllm.lora_rank_for_vllm(17) == 32
    with pytest.raises(vllm.VllmError, match="LoRA adapters from cloud storage only"):
        vllm.llm_config(vllm.VllmTarget("m", "base", 64, lora_root="/local/run/qcrd", lora_name="adapter"), serve_cfg)
    with pytest.raises(vllm.VllmError, match="storage options"):
        vllm.llm_config(vllm.VllmTarget("m", "s3://b/m?endpoint_override=x", 64), serve_cfg)

    # the exact schema: ray 2.60's own LLMConfig model accepts both (it imports without vLLM; ray.serve.llm does not)
    llm_config_model = pytest.importorskip("ray.llm._internal.serve.core.configs.llm_config").LLMConfig
    for c in (vllm.llm_config(target, serve_cfg), config):
        parsed = llm_config_model.model_validate(c)
        assert parsed.model_id == "run/qcrd"
    assert parsed.lora_config.dynamic_lora_loading_path == "s3://bucket/run/qcrd"


def test_vllm_serve_config_file_is_valid_for_serve_deploy(tmp_path, capsys):
    """`qcrd serve --engine vllm --write-config FILE`: a Serve config that Serve's own schema accepts, whose one
    application is ray.serve.llm:build_openai_app with the run's causal student; nothing is deployed."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from qcrd_ray.cli import main

    run = tmp_path / "run"
    _fake_model(run / "qcrd" / "model", model_type="llama", max_position_embeddings=300)
    (run / "config.yaml").write_text(Config().replace(student={"family": "causal", "max_input_len": 200}).to_yaml())
    out = tmp_path / "vllm.yaml"
    assert main(["serve", "--engine", "vllm", "--model", str(run / "qcrd"), "--write-config", str(out),
                 "--port", "8123", "--set", "serve.max_new_tokens=150"]) == 0
    printed = capsys.readouterr().out
    assert f"serve deploy {out}" in printed and "'run/qcrd'" in printed
    text = out.read_text()
    assert text.startswith("# qcrd serve --engine vllm: run/qcrd")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert schema.http_options.port == 8123 and schema.http_options.host == "127.0.0.1"
    [app] = schema.applications
    assert (app.import_path, app.route_prefix, app.name) == ("ray.serve.llm:build_openai_app", "/", "qcrd")
    [llm] = app.args["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "run/qcrd", "model_source": str(run / "qcrd" / "model")}
    assert llm["engine_kwargs"] == {"max_model_len": 300}  # 200 + 150, capped by the model's context

    # without --write-config it deploys, which needs vLLM: a clear error before Ray starts
    assert main(["serve", "--engine", "vllm", "--model", str(run / "qcrd")]) == 2
    assert "pip install -e '.[gpu]'" in capsys.readouterr().err


def test_vllm_refuses_a_seq2seq_student_and_a_local_lora(tmp_path, capsys):
    from qcrd_ray.cli import main
    from serve import vllm

    t5 = _fake_model(tmp_path / "t5", model_type="t5", is_encoder_decoder=True)
    assert main(["serve", "--engine", "vllm", "--model", str(t5), "--write-config", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "seq2seq" in err and "vLLM serves decoder-only models only" in err and "--engine qcrd" in err
    assert not (tmp_path / "x.yaml").exists()

    run = tmp_path / "run"
    base = _fake_model(tmp_path / "base", model_type="llama")
    _fake_model(run / "qcrd" / "model", model_type="llama")
    (run / "qcrd" / "adapter").mkdir()
    (run / "qcrd" / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base),
                                                                             "r": 16}))
    (run / "config.yaml").write_text(Config().to_yaml())
    target = vllm.resolve_target(str(run / "qcrd"), Config(), lora=True)
    assert (target.model_source, target.lora_root, target.lora_name, target.lora_rank) == (
        str(base), str(run / "qcrd"), "adapter", 16)
    assert main(["serve", "--engine", "vllm", "--model", str(run / "qcrd"), "--lora", "--write-config",
                 str(tmp_path / "y.yaml")]) == 2
    assert "cloud storage only" in capsys.readouterr().err
    assert main(["serve", "--model", str(run / "qcrd"), "--lora"]) == 2  # vLLM's flags need --engine vllm
    assert "go with --engine vllm" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# a causal student over HTTP



QUESTIONS = [
    "Tom has 5 apples. He buys 3 more.\nHow many apples does he have now?",
    "Anna packs 70 books into bags of 10.\nHow many bags does she fill?",
]
MAX_INPUT_LEN = 128  # the run's student.max_input_len: the questions fit, three of them in a row do not
CAUSAL_CONFIG = Config().replace(student={"family": "causal", "max_input_len": MAX_INPUT_LEN, "max_target_len": 48},
                                 data={"synthetic_eval_size": 6})
NAME = "tiny-causal"


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    """A causal run directory: RUN/config.yaml and RUN/model/, a tiny Llama trained through a chat template."""
    run = tmp_path_factory.mktemp("serve-causal") / NAME
    run.mkdir()
    template = run / "chat_template.jinja"
    template.write_text(TINY_CHAT_TEMPLATE)
    train_tiny_student(run / "model", family="causal", chat_template=str(template))
    (run / "config.yaml").write_text(CAUSAL_CONFIG.to_yaml())
    return run


@pytest.fixture(scope="module")
def causal_server(ray_session, causal_run):
    from ray import serve

    from serve.app import build

    port = free_port()
    cfg = Config().replace(serve={"min_replicas": 1, "max_replicas": 1, "max_batch_size": 8,
                                  "batch_wait_timeout_s": 0.05, "max_input_chars": 500,
                                  "max_inputs_per_request": 8, "max_new_tokens": 48})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(causal_run, cfg), name="qcrd-causal", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def causal_model(causal_run):
    from qcrd_ray import students

    return students.load_pretrained(causal_run / "model")


@pytest.fixture(scope="module")
def causal_reference(causal_model):
    """Evaluation's path: the student inputs rendered by the family (its chat template) and decoded greedily."""
    from qcrd_ray import students

    model, tok = causal_model
    return lambda texts: students.generate(model, tok, texts, max_new_tokens=48)


def _client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=patience(120))


@pytest.mark.ray
def test_causal_chat_reads_the_task_prompt_through_its_template(causal_server, causal_model, causal_reference):
    """A plain question is asked in explain mode and rendered by the chat template exactly as training rendered
    `explain: x`, so chat answers what evaluation's greedy decoding answers; a `predict: ` message gets the label."""
    from qcrd_ray.data import prompts
    from qcrd_ray.students import family_of

    client = _client(causal_server)
    explain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                             max_tokens=48, temperature=0)
    assert explain.object == "chat.completion" and explain.model == NAME and len(explain.choices) == 1
    [want] = causal_reference([prompts.student_input("explain", QUESTIONS[0])])
    assert explain.choices[0].message.role == "assistant" and explain.choices[0].message.content == want
    model, tok = causal_model
    family = family_of(model)
    rendered = family.prompt(tok, prompts.student_input("explain", QUESTIONS[0]))
    assert rendered.startswith("user: explain: ") and rendered.endswith("assistant:")  # through the template
    assert explain.usage.prompt_tokens == family.prompt_lengths(tok, [rendered])[0]

    predict = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": prompts.student_input("predict", QUESTIONS[1])}],
        max_tokens=48, temperature=0, n=2)
    [label] = causal_reference([prompts.student_input("predict", QUESTIONS[1])])
    assert [c.message.content for c in predict.choices] == [label, label]
    assert [c.index for c in predict.choices] == [0, 1]

    # /v1/completions takes the student input itself and renders it the same way
    done = client.completions.create(model=NAME, prompt=prompts.student_input("explain", QUESTIONS[0]),
                                     max_tokens=48, temperature=0)
    assert done.choices[0].text == want


@pytest.mark.ray
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_causal_streams_add_up_to_the_non_streamed_text(causal_server, route):
    from qcrd_ray.data import prompts

    client = _client(causal_server)
    for question, stop in ((QUESTIONS[0], None), (QUESTIONS[1], [" question"])):
        if route == "chat":
            kwargs = dict(model=NAME, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0,
                          stop=stop)
            whole = client.chat.completions.create(**kwargs)
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            assert chunks[0].choices[0].delta.role == "assistant"
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
            expected = whole.choices[0].message.content
        else:
            kwargs = dict(model=NAME, prompt=prompts.student_input("explain", question), max_tokens=48,
                          temperature=0, stop=stop)
            whole = client.completions.create(**kwargs)
            chunks = list(client.completions.create(**kwargs, stream=True))
            assert all(c.object == "text_completion" for c in chunks)
            streamed = "".join(c.choices[0].text for c in chunks)
            expected = whole.choices[0].text
        assert streamed == expected and expected
        assert len(chunks) > 3  # pieces as they were generated, not one block
        assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        if stop:
            assert " question" not in expected and whole.choices[0].finish_reason == "stop"


@pytest.mark.ray
def test_a_stream_is_server_sent_events_ending_in_done(causal_server):
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 16,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{causal_server}/v1/chat/completions", json=body, timeout=patience(120)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == (
        chunks[-1]["usage"]["prompt_tokens"] + chunks[-1]["usage"]["completion_tokens"])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.ray
def test_a_prompt_over_the_students_input_length_is_refused(causal_server):
    """Three questions in a row are over the run's student.max_input_len (128 tokens) but under the character
    limit: every route answers 422 naming the field and both lengths instead of truncating."""
    import openai

    from qcrd_ray.data import prompts

    long = " ".join(QUESTIONS * 3)
    cases = [
        ("predict", {"input": long}, "input"),
        ("completions", {"prompt": prompts.student_input("predict", long), "max_tokens": 4}, "prompt"),
        ("completions", {"prompt": prompts.student_input("predict", long), "stream": True}, "prompt"),
        ("chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
        ("chat/completions", {"messages": [{"role": "user", "content": long}], "stream": True}, "messages"),
    ]
    for route, body, param in cases:
        resp = httpx.post(f"{causal_server}/v1/{route}", json=body, timeout=patience(60))
        assert resp.status_code == 422, (route, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and f"over this model's limit of {MAX_INPUT_LEN} input tokens" in \
            error["message"], error
        assert int(error["message"].split("the prompt is ")[1].split()[0]) > MAX_INPUT_LEN

    client = _client(causal_server)
    with pytest.raises(openai.UnprocessableEntityError, match="limit of 128 input tokens"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": long}], stream=True)
    with pytest.raises(openai.UnprocessableEntityError, match="a streamed request returns one choice"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], stream=True, n=2)
    # the service still answers
    ok = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                        max_tokens=8, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
