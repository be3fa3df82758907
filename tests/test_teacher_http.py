"""The http teacher backend against a real OpenAI-compatible server on 127.0.0.1 that fails some requests
(500, 429, 503 forever, a timeout) and returns garbage for others; in process and through the Ray pipeline."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from qcrd_ray.config import Config
from qcrd_ray.data.schema import examples_table
from qcrd_ray.teacher.backends.http import HTTPBackend
from qcrd_ray.teacher.pipeline import iter_teacher_rows, run_teacher
from qcrd_ray.teacher.samples import expand_samples, sample_seed

SLOW_S = 1.0  # the "slow" class answers after this long on a first attempt; the client times out before
# what the server does with a request, by its seed % 7, and the sample status that must come of it
BEHAVIOUR = {0: "500 then ok", 1: "429 then ok", 2: "garbage body", 3: "unparsable text", 4: "503 forever",
             5: "slow then ok", 6: "ok"}
EXPECTED = {0: "ok", 1: "ok", 2: "request_error", 3: "no_answer", 4: "request_error", 5: "ok", 6: "ok"}
GOOD = "<Explanation>: I add the two numbers together. <Answer>: 8"


class FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        state = self.server.state
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seed = request["seed"]
        # a request the client timed out on keeps a server thread busy: count only the others as in flight
        counted = seed % 7 != 5
        with state["lock"]:
            state["attempts"][seed] += 1
            attempt = state["attempts"][seed]
            state["inflight"] += counted
            state["max_inflight"] = max(state["max_inflight"], state["inflight"])
            state["auth"].add(self.headers.get("Authorization"))
            state["paths"].add(self.path)
        try:
            time.sleep(0.02)  # let concurrent requests overlap
            kind = seed % 7
            if (kind == 0 and attempt == 1) or kind == 4:
                return self._send(500 if kind == 0 else 503, b'{"error": "overloaded"}')
            if kind == 1 and attempt == 1:
                return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
            if kind == 2:
                return self._send(200, b"<html>upstream proxy error</html>")
            if kind == 5 and attempt == 1:
                time.sleep(SLOW_S)
            text = "no idea, sorry" if kind == 3 else GOOD
            choice = {"message": {"role": "assistant", "content": text}} if self.path.endswith("/chat/completions") \
                else {"text": text}
            self._send(200, json.dumps({"id": "x", "choices": [choice]}).encode())
        finally:
            with state["lock"]:
                state["inflight"] -= counted

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out closed its socket: expected here


@pytest.fixture()
def openai_server():
    server = _Server(("127.0.0.1", 0), FakeOpenAI)
    server.state = {"lock": threading.Lock(), "attempts": Counter(), "inflight": 0, "max_inflight": 0,
                    "auth": set(), "paths": set()}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _cfg(server, **teacher) -> Config:
    return Config().replace(teacher={
        "backend": "http", "model": "gpt-3.5-turbo", "base_url": f"http://127.0.0.1:{server.server_port}/v1",
        "timeout_s": 0.4, "max_retries": 2, "backoff_s": 0.01, "max_concurrency": 3, **teacher,
    })


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_http_backend_retries_records_failures_and_limits_concurrency(openai_server, monkeypatch, api):
    monkeypatch.setenv("QCRD_TEST_KEY", "sk-test")
    backend = HTTPBackend(_cfg(openai_server, api=api, api_key_env="QCRD_TEST_KEY"))
    rows = [{"id": f"e{i}", "task": "synthetic", "input": "q", "choices": [], "label": "( 5.0 + 3.0 )",
             "rationales": []} for i in range(14)]
    batch = expand_samples(examples_table(rows), k=1, teacher_seed=0, prompt_fn=lambda row: "Q: " + row["input"])
    # seeds 0..13: every server behaviour twice
    batch = batch.set_column(batch.schema.get_field_index("seed"), "seed", pa.array(range(14), pa.int64()))
    out = backend(batch).to_pylist()
    state = openai_server.state
    for row in out:
        kind = row["seed"] % 7
        assert bool(row["error"]) == (EXPECTED[kind] == "request_error"), (BEHAVIOUR[kind], row)
        if EXPECTED[kind] == "ok":
            assert row["text"] == GOOD, BEHAVIOUR[kind]
    by_seed = {row["seed"]: row for row in out}
    assert "bad response body" in by_seed[2]["error"] and state["attempts"][2] == 1  # garbage is not retried
    assert "HTTP 503" in by_seed[4]["error"] and "gave up after 3 attempts" in by_seed[4]["error"]
    assert state["attempts"][4] == 3 and state["attempts"][0] == 2 and state["attempts"][1] == 2
    assert state["attempts"][5] == 2  # timed out once, then answered
    assert by_seed[3]["text"] == "no idea, sorry" and not by_seed[3]["error"]
    assert 1 < state["max_inflight"] <= 3
    assert state["auth"] == {"Bearer sk-test"}
    assert state["paths"] == {"/v1/chat/completions" if api == "chat" else "/v1/completions"}


def test_the_api_key_comes_from_a_file_on_the_node_before_the_environment(tmp_path, monkeypatch, s3_server):
    """teacher.api_key_file (a path or a storage URI, read by the actor) wins over $api_key_env; the config holds
    where the key is, never the key; a named file that is missing or empty is an error, not "no key"."""
    import dataclasses

    from qcrd_ray import storage
    from qcrd_ray.teacher.backends.http import api_key

    monkeypatch.setenv("QCRD_TEST_KEY", "sk-env")
    teacher = dataclasses.replace(Config().teacher, api_key_env="QCRD_TEST_KEY")
    assert api_key(teacher) == "sk-env"
    (tmp_path / "key").write_text("sk-file\n")
    assert api_key(dataclasses.replace(teacher, api_key_file=str(tmp_path / "key"))) == "sk-file"
    storage.write_bytes(f"{s3_server}/secrets/teacher-key", b"sk-bucket")
    with_uri = Config().replace(teacher={"api_key_file": f"{s3_server}/secrets/teacher-key"})
    assert api_key(with_uri.teacher) == "sk-bucket" and "sk-bucket" not in with_uri.to_yaml()
    (tmp_path / "empty").write_text("")
    for path, words in ((tmp_path / "missing", "cannot read"), (tmp_path / "empty", "is empty")):
        with pytest.raises(ValueError, match=words):
            api_key(dataclasses.replace(teacher, api_key_file=str(path)))
    monkeypatch.delenv("QCRD_TEST_KEY")
    assert api_key(teacher) is None


def test_http_pipeline_keeps_every_sample_and_counts_failures(ray_session, openai_server, tmp_path):
    cfg = _cfg(openai_server).replace(
        data={"synthetic_train_size": 10}, teacher={"k": 3, "shard_rows": 4, "batch_size": 6})
    summary = run_teacher(cfg, tmp_path)
    rows = list(iter_teacher_rows(tmp_path))
    assert sorted(r["id"] for r in rows) == sorted(f"synthetic-train-{i}" for i in range(10))
    statuses = Counter()
    for row in rows:
        assert [s["index"] for s in row["samples"]] == [0, 1, 2]
        for s in row["samples"]:
            kind = sample_seed(cfg.teacher.seed, row["id"], s["index"]) % 7
            assert s["status"] == EXPECTED[kind], (BEHAVIOUR[kind], s)
            statuses[s["status"]] += 1
    assert summary["samples"] == 30 and summary["request_failures"] == statuses["request_error"] > 0
    assert summary["parse_failures"] == statuses["no_answer"]
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 30 - statuses["ok"] and all(e["reason"] for e in errors)
