"""Helpers shared by the test suite and the benchmarks (no hub here: models are built and trained locally)."""

from __future__ import annotations

from pathlib import Path

# A minimal chat template for a tiny causal student (``student.chat_template``: a Jinja file): every character of it
# is in the tiny tokenizer's alphabet, so a student trained through it reads it like any other text.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def train_tiny_student(path: str | Path, steps: int = 100, train_size: int = 200, seed: int = 0,
                       family: str = "seq2seq", chat_template: str = "auto") -> None:
    """A tiny student of ``family`` (``seq2seq``: T5; ``causal``: a Llama-style decoder) fine-tuned for ``steps``
    steps on the synthetic task in both modes (predict: the equation; explain: a one-sentence rationale + the
    equation), so greedy outputs are short and stable; saved in HF format like a run's ``model/``.
    ``chat_template`` is ``student.chat_template`` (a causal student: ``auto`` = none for the tiny tokenizer, or
    the path of a Jinja file, e.g. :data:`TINY_CHAT_TEMPLATE` written out). Both families train the same way,
    through the family's API: prompts rendered by ``family.prompt``, the token-mean cross-entropy of the target."""
    import torch

    from qcrd_ray import students as student
    from qcrd_ray.config import StudentConfig
    from qcrd_ray.data import prompts, synthetic
    from qcrd_ray.qcrd.losses import sequence_ce

    rows = synthetic.make_split("train", train_size=train_size, eval_size=20, seed=seed)
    pairs = []
    for r in rows:
        pairs.append((prompts.student_input("predict", r["input"]), r["label"]))
        pairs.append((prompts.student_input("explain", r["input"]),
                      prompts.explain_target("We use the numbers in the question.", r["label"])))
    cfg = StudentConfig(family=family, chat_template=chat_template)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only spin against each other
    torch.manual_seed(seed)
    try:
        model, tok = student.load_student(cfg, [t for pair in pairs for t in pair])
        fam = student.family_of(model)
        rendered = [(fam.prompt(tok, a), b) for a, b in pairs]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(steps):
            batch = rendered[(step * 16) % len(rendered):][:16]
            ids, mask = fam.encode_prompts(tok, [a for a, _ in batch], cfg.max_input_len)
            labels = fam.encode_targets(tok, [b for _, b in batch], cfg.max_target_len)
            loss = sequence_ce(fam.target_logits(model, ids, mask, labels), labels).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    student.save_student(model, tok, path)


PATIENCE_ENV = "QCRD_TEST_PATIENCE"


def patience(seconds: float) -> float:
    """A test's bound on a wait (a hang guard, never a speed target): ``seconds`` times ``$QCRD_TEST_PATIENCE``
    (default 1). The one knob for a slower or busier machine: every timeout in the suite, pytest-timeout's
    per-test limit included, goes through it."""
    import os

    scale = float(os.environ.get(PATIENCE_ENV, "1"))
    if not scale > 0:
        raise ValueError(f"{PATIENCE_ENV} must be a positive number, got {scale}")
    return seconds * scale


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a server started by a test or benchmark binds it next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3's own error answers (status, code, message), as a misbehaving bucket sends them
_S3_ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
              "500": (500, "InternalError", "We encountered an internal error. Please try again.")}
FAULT_MODES = ("503", "500", "reset", "hang", "slow")
# hop-by-hop headers: they describe one connection, so the proxy sets its own on each side
_HOP = ("connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade")


class FaultProxy:
    """A reverse HTTP proxy that misbehaves like a real object store, for tests and benchmarks: put in front of an
    S3 server (clients use :meth:`uri`, whose ``endpoint_override`` is the proxy), it forwards every request or
    fails a ``share`` of them, each with one of ``modes``:

    - ``503``: S3's SlowDown (XML body); ``500``: InternalError;
    - ``reset``: the connection closed without an answer (a TCP reset);
    - ``hang``: no answer for ``delay_s``, then the connection closed, as a stuck server;
    - ``slow``: the right answer, after ``delay_s`` (throttling).

    Failures happen before the server sees the request. Which requests fail, and how, is drawn from a seeded RNG
    in arrival order, so a given sequence of requests fails the same way every time. :meth:`configure` changes
    the share, modes, seed and delay at runtime (one proxy serves several tests) and resets the counts
    (``requests``; ``injected``, per mode)."""

    def __init__(self, upstream: str, share: float = 0.0, modes=FAULT_MODES, seed: int = 0, delay_s: float = 0.5):
        import threading
        from http.server import ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        self._lock = threading.Lock()
        self.configure(share, modes, seed, delay_s)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self._server.daemon_threads = True
        self.address = f"127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()

    def configure(self, share: float = 0.0, modes=FAULT_MODES, seed: int = 0, delay_s: float = 0.5) -> "FaultProxy":
        import collections
        import random

        unknown = set(modes) - set(FAULT_MODES)
        if unknown or not modes:
            raise ValueError(f"fault modes must be among {FAULT_MODES}, got {modes}")
        with self._lock:
            self.share, self.modes, self.delay_s = share, tuple(modes), delay_s
            self._rng = random.Random(seed)
            self.requests, self.injected = 0, collections.Counter()
        return self

    def draw(self) -> str | None:
        """The fault of the next request, or None to forward it."""
        with self._lock:
            self.requests += 1
            if self._rng.random() >= self.share:
                return None
            mode = self._rng.choice(self.modes)
            self.injected[mode] += 1
            return mode

    def uri(self, location: str) -> str:
        """``location`` (``s3://bucket/...``) reached through this proxy."""
        return f"{location}?endpoint_override={self.address}&scheme=http"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _proxy_handler(proxy: FaultProxy):
    import http.client
    import socket
    import struct
    import time
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            body = self._body()
            mode = proxy.draw()
            if mode in ("slow", "hang"):
                time.sleep(proxy.delay_s)
            if mode in ("reset", "hang"):
                # linger 0: closing sends a reset, as a load balancer dropping the connection does
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            if mode in _S3_ERRORS:
                status, code, message = _S3_ERRORS[mode]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                       f"</Message><RequestId>fault-{proxy.requests}</RequestId></Error>").encode()
                self._answer(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))], xml)
                return
            up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                up.request(self.command, self.path, body, headers)
                resp = up.getresponse()
                data = resp.read()
            finally:
                up.close()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            if self.command != "HEAD":  # a HEAD keeps the object's length; anything else: the body's
                out = [(k, v) for k, v in out if k.lower() != "content-length"] + [("Content-Length", str(len(data)))]
            self._answer(resp.status, out, data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


class HoldingTeacher:
    """An OpenAI-compatible chat server on 127.0.0.1 that holds requests, for fault tests of the http teacher: it
    answers the first ``answer_freely`` requests with ``answer``, then holds each later one (counted on
    :attr:`held`, a semaphore a test waits on) until :meth:`resume` or ``hold_s``. So a kill, of an actor or of a
    node, always lands with batches in flight, however loaded the machine. :attr:`attempts` counts the requests
    per sample seed (a resent batch shows as a seed asked twice); :meth:`holders` names the processes waiting on a
    held request, so a test kills one that really has a batch in flight."""

    def __init__(self, answer: str, answer_freely: int, hold_s: float):
        import collections
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.attempts, self.requests, self._held_ports = collections.Counter(), 0, set()
        self.held, self._resume, self._lock = threading.Semaphore(0), threading.Event(), threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with teacher._lock:
                    teacher.attempts[request["seed"]] += 1
                    teacher.requests += 1
                    hold = teacher.requests > answer_freely
                    if hold:
                        teacher._held_ports.add(self.client_address[1])
                if hold:
                    teacher.held.release()
                    teacher._resume.wait(hold_s)
                body = json.dumps({"id": "x", "choices": [{"message": {"role": "assistant", "content": answer}}]})
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body.encode())
                except OSError:
                    pass  # the client (a killed actor) is gone

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/v1"
        threading.Thread(target=self._server.serve_forever, name="holding-teacher", daemon=True).start()

    def holders(self) -> set[int]:
        """The pids of the processes whose connection holds a request now (from the kernel's socket table: the
        client end of a held connection is a local port this server saw)."""
        import psutil

        with self._lock:
            ports = set(self._held_ports)
        return {c.pid for c in psutil.net_connections(kind="tcp")
                if c.pid and c.laddr and c.laddr.port in ports and c.raddr and c.raddr.port == self._server.server_port}

    def resume(self) -> None:
        """Answer every held request, and every later one at once."""
        self._resume.set()

    def close(self) -> None:
        self.resume()
        self._server.shutdown()
        self._server.server_close()
