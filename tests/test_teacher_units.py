"""Pure parts of the teacher stage (no Ray): sample duplication and seeds, parsing, self-consistency, the
synthetic teacher, shard bookkeeping, the run summary, HTTP request/response handling and vLLM config building."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from qcrd_ray.config import Config, ConfigError
from qcrd_ray.data import answers, prompts
from qcrd_ray.data.schema import TEACHER_SCHEMA, examples_table
from qcrd_ray.data.tasks import get_task
from qcrd_ray.teacher.backends.base import Completion, TeacherBackend
from qcrd_ray.teacher.backends.http import backoff_delay, request_payload, response_text
from qcrd_ray.teacher.backends.synthetic import synthetic_output
from qcrd_ray.teacher.backends import vllm
from qcrd_ray.teacher.consistency import self_consistency, teacher_row
from qcrd_ray.teacher.samples import expand_samples, parse_samples, sample_seed
from qcrd_ray.teacher.shards import ShardCollector, check_manifest, manifest, plan_shards
from qcrd_ray.teacher.summary import format_table, summarize

EXAMPLES = [
    {"id": "a", "task": "synthetic", "input": "Tom has 5 apples and buys 3.", "choices": [], "label": "( 5.0 + 3.0 )",
     "rationales": []},
    {"id": "b", "task": "synthetic", "input": "Mia has 8 cards and gives 2.", "choices": [], "label": "( 8.0 - 2.0 )",
     "rationales": []},
]


def s(index, answer, rationale="r", status="ok"):
    return {"index": index, "answer": answer, "rationale": f"{rationale}{index}", "status": status, "text": "", "error": ""}


# ---------------------------------------------------------------------------------------------------- samples


def test_expand_samples_repeats_each_example_k_times_with_distinct_stable_seeds():
    out = expand_samples(examples_table(EXAMPLES), k=3, teacher_seed=7, prompt_fn=lambda row: "Q: " + row["input"])
    rows = out.to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert len({r["seed"] for r in rows}) == 6
    assert rows[4]["seed"] == sample_seed(7, "b", 1)  # depends only on (seed, id, index), not on the batch
    assert rows[0]["prompt"] == "Q: " + EXAMPLES[0]["input"] and rows[0]["label"] == "( 5.0 + 3.0 )"
    assert sample_seed(8, "b", 1) != sample_seed(7, "b", 1)
    no_prompt = expand_samples(examples_table(EXAMPLES), k=1, teacher_seed=7)
    assert no_prompt.column("prompt").to_pylist() == ["", ""]


def test_parse_samples_marks_failed_requests_and_unparsable_outputs():
    batch = expand_samples(examples_table(EXAMPLES[:1]), k=4, teacher_seed=0)
    batch = batch.append_column(
        "text", pa.array(["<Explanation>: 5 + 3 = 8. <Answer>: 8", "I think so", "", "ignored"])
    ).append_column("error", pa.array(["", "", "", "HTTP 500: boom (gave up after 3 attempts)"]))
    rows = parse_samples(batch, prompts.parse_teacher_output, "synthetic").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "no_answer", "empty", "request_error"]
    assert rows[0]["answer"] == "8" and rows[0]["rationale"] == "5 + 3 = 8."
    assert rows[3]["answer"] is None


def test_a_parser_crash_is_recorded_on_its_sample():
    def parser(task, text, choices):
        if "boom" in text:
            raise RecursionError("too deep")
        return prompts.parse_teacher_output(task, text, choices)

    batch = expand_samples(examples_table(EXAMPLES[:1]), k=2, teacher_seed=0)
    batch = batch.append_column("text", pa.array(["<Answer>: 8", "boom"])).append_column("error", pa.array(["", ""]))
    rows = parse_samples(batch, parser, "synthetic").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "no_answer"]
    assert rows[0]["error"] == "" and rows[1]["error"] == "parse failed: RecursionError: too deep"


class _Broken(TeacherBackend):
    def complete(self, rows):
        raise TimeoutError("engine stalled")


class _Short(TeacherBackend):
    def complete(self, rows):
        return [Completion(text="x")]


@pytest.mark.parametrize("backend", [_Broken, _Short])
def test_a_failing_backend_batch_becomes_error_rows_not_an_exception(backend):
    batch = expand_samples(examples_table(EXAMPLES), k=2, teacher_seed=0)
    out = backend(Config())(batch)
    assert out.num_rows == 4 and out.column("text").to_pylist() == [""] * 4
    assert all(out.column("error").to_pylist())


class _Poisoned(TeacherBackend):
    """Crashes (an exception, not a failed request) on any batch holding example "poison"."""

    calls: list = []

    def complete(self, rows):
        self.calls.append([(r["id"], r["sample_index"]) for r in rows])
        if any(r["id"] == "poison" for r in rows):
            raise RuntimeError("CUDA error: an illegal memory access")
        return [Completion(text=f"<Explanation>: ok. <Answer>: {r['sample_index']}") for r in rows]


def test_a_row_that_crashes_the_backend_is_retried_alone_then_recorded_and_its_batch_kept():
    examples = [{**EXAMPLES[0], "id": i} for i in ("a", "poison", "b")]
    batch = expand_samples(examples_table(examples), k=1, teacher_seed=0)
    _Poisoned.calls = []
    out = _Poisoned(Config().replace(teacher={"poison_retries": 2}))(batch).to_pylist()
    assert [r["text"] for r in out] == ["<Explanation>: ok. <Answer>: 0", "", "<Explanation>: ok. <Answer>: 0"]
    assert out[1]["error"] == ("backend crashed on this row (3 attempts): RuntimeError: CUDA error: an illegal "
                               "memory access") and out[0]["error"] == out[2]["error"] == ""
    assert _Poisoned.calls.count([("poison", 0)]) == 3  # retried alone twice after its first failure alone
    record = parse_samples(pa.Table.from_pylist(out), prompts.parse_teacher_output, "synthetic").to_pylist()[1]
    assert record["status"] == "request_error" and record["id"] == "poison"


# ---------------------------------------------------------------------------------------------------- self-consistency


def test_majority_answer_rationales_are_positives_and_the_rest_negatives():
    samples = [s(0, "8"), s(1, "( 5 + 3 )"), s(2, "9"), s(3, None, status="no_answer"), s(4, "8.0")]
    sc = self_consistency("synthetic", samples, "( 5.0 + 3.0 )")
    assert sc.majority_answer == "8"  # "8", "( 5 + 3 )" and "8.0" are one answer
    assert sc.positives == ["r0", "r1", "r4"]
    assert sc.negatives == ["r2"]  # the unanswered sample is neither
    assert sc.agreement == pytest.approx(3 / 4) and sc.teacher_correct


def test_tie_is_won_by_the_answer_matching_gold_else_lexically_first():
    samples = [s(0, "9"), s(1, "8"), s(2, "9"), s(3, "8")]
    sc = self_consistency("synthetic", samples, "( 5.0 + 3.0 )")
    assert sc.majority_answer == "8" and sc.teacher_correct and sc.agreement == 0.5
    wrong_tie = self_consistency("synthetic", samples, "( 5.0 + 5.0 )")
    assert wrong_tie.majority_answer == "8"  # neither matches gold: key "8" < "9"
    assert not wrong_tie.teacher_correct
    # a larger group beats a gold-matching smaller one
    sc = self_consistency("synthetic", [s(0, "9"), s(1, "9"), s(2, "8")], "( 5.0 + 3.0 )")
    assert sc.majority_answer == "9" and not sc.teacher_correct


def test_all_wrong_majority_rule_keeps_a_wrong_positive_and_gold_rule_keeps_none():
    samples = [s(0, "9"), s(1, "9"), s(2, "7")]
    majority = self_consistency("synthetic", samples, "( 5.0 + 3.0 )", rule="majority")
    assert majority.positives == ["r0", "r1"] and not majority.teacher_correct
    gold = self_consistency("synthetic", samples, "( 5.0 + 3.0 )", rule="gold")
    assert gold.positives == [] and len(gold.negatives) == 3
    assert gold.majority_answer == "9"  # the teacher's vote is still reported


def test_gold_rule_takes_every_correct_sample_even_in_the_minority():
    samples = [s(0, "9"), s(1, "9"), s(2, "8")]
    gold = self_consistency("synthetic", samples, "( 5.0 + 3.0 )", rule="gold")
    assert gold.positives == ["r2"] and gold.negatives == ["r0", "r1"]


def test_k1_and_no_answer_cases():
    one = self_consistency("synthetic", [s(0, "8")], "( 5.0 + 3.0 )")
    assert one.positives == ["r0"] and one.negatives == [] and one.agreement == 1.0
    none = self_consistency("synthetic", [s(0, None, status="no_answer"), s(1, "", status="request_error")], "( 5.0 + 3.0 )")
    assert none.positives == [] and none.majority_answer is None and none.agreement == 0.0 and not none.teacher_correct


def test_choice_tasks_group_letters_and_words():
    choices = ["table", "cupboard", "oven", "floor", "sink"]
    samples = [s(0, "cupboard"), s(1, "(b) cupboard"), s(2, "oven")]
    sc = self_consistency("cqa", samples, "cupboard", choices)
    assert sc.teacher_correct and sc.agreement == pytest.approx(2 / 3) and len(sc.negatives) == 1


def test_duplicate_rationales_are_kept_once_and_answers_without_rationale_only_vote():
    samples = [{**s(i, "8"), "rationale": " same "} for i in range(3)] + [{**s(3, "9"), "rationale": ""}]
    sc = self_consistency("synthetic", samples, "( 5.0 + 3.0 )")
    assert sc.positives == ["same"] and sc.negatives == [] and sc.agreement == 0.75


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="positive_rule"):
        self_consistency("synthetic", [], "1", rule="vote")


def test_teacher_row_fits_the_schema():
    row = teacher_row(EXAMPLES[0], [s(1, "9"), s(0, "8"), s(2, None, status="empty")], get_task("synthetic"))
    table = pa.Table.from_pylist([row], schema=TEACHER_SCHEMA)
    assert table.num_rows == 1 and [x["index"] for x in row["samples"]] == [0, 1, 2]
    assert "rationales" not in row


# ---------------------------------------------------------------------------------------------------- synthetic teacher


def test_synthetic_teacher_is_seeded_parses_like_a_real_teacher_and_errs_more_when_hotter():
    label = "( 12.0 * 3.0 )"
    assert synthetic_output(label, 5, 0.7, "q") == synthetic_output(label, 5, 0.7, "q")
    parsed = prompts.parse_teacher_output("synthetic", synthetic_output(label, 1, 0.0, "q"))
    assert parsed.status in ("ok", "no_answer")

    def error_rate(temperature):
        wrong = 0
        for i in range(400):
            p = prompts.parse_teacher_output("synthetic", synthetic_output(label, i, temperature, f"q{i % 40}"))
            wrong += p.status != "ok" or not answers.is_correct("synthetic", p.answer, label)
        return wrong / 400

    cold, warm, hot = error_rate(0.0), error_rate(0.7), error_rate(1.5)
    assert cold < warm < hot and cold < 0.2 and hot > 0.5
    kinds = {prompts.parse_teacher_output("synthetic", synthetic_output(label, i, 1.5, "q")).status for i in range(100)}
    assert kinds == {"ok", "no_answer"}
    with pytest.raises(ValueError):
        synthetic_output("cupboard", 0, 0.7)


# ---------------------------------------------------------------------------------------------------- shards and summary


def test_shard_collector_writes_each_shard_once_all_its_samples_arrived(tmp_path):
    examples = [{**EXAMPLES[0], "id": f"e{i}"} for i in range(5)]
    shards = plan_shards(5, 2, tmp_path)
    assert [(sh.start, sh.stop) for sh in shards] == [(0, 2), (2, 4), (4, 5)]
    collector = ShardCollector(shards, examples, 2, get_task("synthetic"), "majority")
    rows = [
        {"shard": i // 2, "id": f"e{i}", "sample_index": j, "text": "t", "error": "", "rationale": "r",
         "answer": "8", "status": "ok"}
        for i in range(5) for j in range(2)
    ]
    random.Random(0).shuffle(rows)
    finished = []
    for start in range(0, len(rows), 3):
        finished += collector.add(pa.Table.from_pylist(rows[start:start + 3]))
    assert sorted(sh.index for sh, _ in finished) == [0, 1, 2] and collector.unfinished == []
    by_index = {sh.index: table for sh, table in finished}
    assert by_index[1].column("id").to_pylist() == ["e2", "e3"]  # input order, whatever the arrival order
    assert by_index[1].schema.equals(TEACHER_SCHEMA)


def test_shard_collector_keeps_a_sample_delivered_twice_once_and_refuses_strangers(tmp_path):
    """Samples are keyed by (example id, sample index): a retried task's second delivery, before or after its shard
    is written, is counted and dropped, never written twice; a sample of an example its shard lacks is an error."""
    examples = [{**EXAMPLES[0], "id": f"e{i}"} for i in range(4)]
    shards = plan_shards(4, 2, tmp_path)
    row = lambda i, j, text="t": {"shard": i // 2, "id": f"e{i}", "sample_index": j, "text": text,  # noqa: E731
                                  "error": "", "rationale": "r", "answer": "8", "status": "ok"}
    collector = ShardCollector(shards, examples, 2, get_task("synthetic"), "majority")
    assert collector.add(pa.Table.from_pylist([row(0, 0), row(0, 0, "again"), row(0, 1), row(1, 0)])) == []
    [(shard, table)] = collector.add(pa.Table.from_pylist([row(1, 1), row(1, 1)]))
    assert shard.index == 0 and [len(s) for s in table.column("samples").to_pylist()] == [2, 2]
    assert table.column("samples").to_pylist()[0][0]["text"] == "t"  # the first delivery is the one kept
    assert collector.add(pa.Table.from_pylist([row(0, 1)])) == [] and collector.duplicates == 3
    stranger = {**row(2, 0), "id": "e9"}
    collector.add(pa.Table.from_pylist([stranger, row(2, 1), row(3, 0)]))
    with pytest.raises(RuntimeError, match="example 'e9', which is not in it"):
        collector.add(pa.Table.from_pylist([row(3, 1)]))


def test_a_kept_shard_must_hold_its_examples_or_it_is_generated_again(tmp_path):
    """On resume a shard file counts only if its footer holds the shard's example count: a truncated, empty or
    short file is refetched."""
    from qcrd_ray import storage
    from qcrd_ray.teacher.shards import kept_shards

    shards = plan_shards(6, 2, tmp_path)
    table = lambda n: pa.table({"id": [f"e{i}" for i in range(n)]})  # noqa: E731
    storage.write_parquet(shards[0].path, table(2))  # whole
    storage.write_parquet(shards[1].path, table(1))  # short
    whole = (tmp_path / "part-00000.parquet").read_bytes()
    (tmp_path / "part-00002.parquet").write_bytes(whole[: len(whole) // 2])  # cut mid-upload
    (tmp_path / "part-00003.parquet").write_bytes(b"")  # not planned: ignored
    kept, refetch = kept_shards(shards, set(storage.list_files(tmp_path, "part-*.parquet")))
    assert [s.index for s in kept] == [0] and [s.index for s in refetch] == [1, 2]


def test_manifest_refuses_to_mix_two_different_runs(tmp_path):
    cfg = Config()
    check_manifest(tmp_path, manifest(cfg, "train", ["a", "b"]))
    check_manifest(tmp_path, manifest(cfg.replace(teacher={"max_actors": 4}), "train", ["a", "b"]))  # no change
    with pytest.raises(ConfigError, match="teacher.temperature"):
        check_manifest(tmp_path, manifest(cfg.replace(teacher={"temperature": 1.0}), "train", ["a", "b"]))
    with pytest.raises(ConfigError, match="ids_sha256"):
        check_manifest(tmp_path, manifest(cfg, "train", ["a", "c"]))


def test_summary_counts_failures_agreement_and_examples_without_positive():
    task = get_task("synthetic")
    rows = [
        teacher_row(EXAMPLES[0], [s(0, "8"), s(1, "8"), s(2, "9"), s(3, None, status="no_answer")], task),
        teacher_row(EXAMPLES[1], [s(0, None, status="request_error"), s(1, None, status="empty"), s(2, "7"),
                                  s(3, "7")], task),
        teacher_row({**EXAMPLES[1], "id": "c"}, [s(i, None, status="request_error") for i in range(4)], task),
    ]
    summary = summarize(rows)
    assert summary["examples"] == 3 and summary["samples"] == 12
    assert summary["parse_failures"] == 2 and summary["request_failures"] == 5
    assert summary["agreement_histogram"] == {"none": 1, "1.00": 1, "0.67": 1}
    assert summary["teacher_accuracy"] == pytest.approx(1 / 3)  # "7" is wrong for ( 8.0 - 2.0 )
    assert summary["examples_without_positive"] == 1 and summary["no_positive_share"] == pytest.approx(1 / 3)
    assert summary["positives_per_example"] == pytest.approx(4 / 3)
    assert summary["negatives_per_example"] == pytest.approx(1 / 3)
    assert "teacher accuracy vs gold" in format_table(summary)
    json.dumps(summary)


# ---------------------------------------------------------------------------------------------------- http, vllm


def test_http_request_payloads_for_chat_and_completions():
    t = Config().replace(teacher={"model": "gpt-3.5-turbo", "stop": ["\n\nQuestion:"]}).teacher
    path, body = request_payload(t, "Q?", 42)
    assert path == "/chat/completions" and body["messages"] == [{"role": "user", "content": "Q?"}]
    assert body["seed"] == 42 and body["temperature"] == 0.7 and body["stop"] == ["\n\nQuestion:"]
    path, body = request_payload(Config().replace(teacher={"api": "completions"}).teacher, "Q?", 1)
    assert path == "/completions" and body["prompt"] == "Q?" and "stop" not in body


def test_http_response_parsing_rejects_bodies_that_are_not_completions():
    assert response_text("chat", {"choices": [{"message": {"content": "hi"}}]}) == "hi"
    assert response_text("chat", {"choices": [{"message": {"content": None}}]}) == ""
    assert response_text("completions", {"choices": [{"text": "yo"}]}) == "yo"
    for body in ({"choices": []}, {"error": "x"}, "garbage", {"choices": [{"message": {"content": 3}}]}):
        with pytest.raises(ValueError):
            response_text("chat", body)


def test_backoff_grows_exponentially_honours_retry_after_and_is_capped():
    assert [backoff_delay(a, 0.5) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(0, 0.5, "3") == 3.0 and backoff_delay(0, 0.5, "Wed, 21 Oct") == 0.5
    assert backoff_delay(20, 1.0) == 60.0


def test_vllm_processor_config_without_vllm_installed():
    cfg = Config().replace(teacher={
        "backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "min_actors": 2, "max_actors": 4, "batch_size": 32,
        "tensor_parallel_size": 2, "stop": ["\n\n"], "api": "completions",
    })
    kwargs = vllm.processor_config_kwargs(cfg)
    assert kwargs["concurrency"] == (2, 4) and kwargs["should_continue_on_error"] is True
    assert kwargs["engine_kwargs"]["tensor_parallel_size"] == 2 and kwargs["chat_template_stage"] is False
    config = vllm.build_config(cfg)  # the real ray.data.llm config class; vLLM itself is not needed
    assert config.model_source == "Qwen/Qwen2.5-7B-Instruct" and config.batch_size == 32
    assert config.should_continue_on_error
    row = {"prompt": "Q?", "seed": 9}
    assert vllm.make_preprocess(cfg.teacher)(row) == {
        "prompt": "Q?", "sampling_params": {"temperature": 0.7, "seed": 9, "max_tokens": 256, "stop": ["\n\n"]}}
    chat = vllm.make_preprocess(Config().replace(teacher={"backend": "vllm", "model": "m"}).teacher)(row)
    assert chat["messages"] == [{"role": "user", "content": "Q?"}]


def test_vllm_outputs_map_inference_errors_to_error_rows():
    batch = pa.table({"id": ["a", "b"], "messages": [["x"], ["y"]], "generated_text": ["<Answer>: 8", ""],
                      "__inference_error__": [None, "CUDA OOM"]})
    out = vllm.output_columns(batch, ["id"]).to_pylist()
    assert out == [{"id": "a", "text": "<Answer>: 8", "error": ""}, {"id": "b", "text": "", "error": "CUDA OOM"}]
