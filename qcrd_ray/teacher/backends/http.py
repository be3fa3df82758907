"""Any OpenAI-compatible endpoint (chat or completions API; the paper's teacher is GPT-3.5-turbo).

Each actor sends up to ``max_concurrency`` requests at once from a thread pool. Timeouts, connection errors,
429 and 5xx are retried with exponential backoff (honouring ``Retry-After``); other 4xx and unreadable
response bodies are not. A request that still fails becomes a sample with its reason, never a failed job.
The API key (none for local servers) is read by each actor on its own node: from ``teacher.api_key_file`` (a
path every node sees, or a storage URI such as ``s3://bucket/secrets/key`` that the nodes' instance role may read)
or else from the environment variable ``teacher.api_key_env``. On a cluster use the file: the config carries only
where the key is, so the key appears in no job metadata (a runtime_env's ``env_vars`` is shown by the dashboard and
``ray job list``), no config dump and no log line.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from qcrd_ray.config import Config, TeacherConfig
from qcrd_ray.teacher.backends.base import Completion, TeacherBackend

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


def request_payload(t: TeacherConfig, prompt: str, seed: int) -> tuple[str, dict]:
    """(path under base_url, JSON body) of one sampling request."""
    body: dict = {"model": t.model or "", "temperature": t.temperature, "max_tokens": t.max_tokens, "seed": seed}
    if t.stop:
        body["stop"] = list(t.stop)
    if t.api == "chat":
        return "/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/completions", {**body, "prompt": prompt}


def response_text(api: str, body: object) -> str:
    """The generated text of an OpenAI-style response body; ValueError when the body is not one."""
    try:
        choice = body["choices"][0]  # type: ignore[index]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not an OpenAI {api} response: {str(body)[:200]!r}") from e
    if text is not None and not isinstance(text, str):
        raise ValueError(f"generated text is a {type(text).__name__}, not a string")
    return text or ""


def backoff_delay(attempt: int, base_s: float, retry_after: str | None = None) -> float:
    delay = base_s * 2**attempt
    if retry_after:
        try:
            delay = max(delay, float(retry_after))
        except ValueError:
            pass  # an HTTP-date Retry-After: keep our own schedule
    return min(delay, MAX_BACKOFF_S)


def api_key(t: TeacherConfig) -> str | None:
    """The key from ``t.api_key_file`` (through the storage layer: a path or a URI) if set, else from
    ``$<t.api_key_env>``; a named file that cannot be read, or is empty, is an error (never "no key")."""
    if t.api_key_file:
        from qcrd_ray import storage

        try:
            key = storage.read_text(t.api_key_file).strip()
        except OSError as e:
            raise ValueError(f"teacher.api_key_file={t.api_key_file}: cannot read the API key ({e})") from e
        if not key:
            raise ValueError(f"teacher.api_key_file={t.api_key_file}: the file is empty")
        return key
    return os.environ.get(t.api_key_env) or None


class HTTPBackend(TeacherBackend):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        t = cfg.teacher
        headers = {}
        if key := api_key(t):
            headers["Authorization"] = f"Bearer {key}"
        else:
            log.info("no API key in $%s; sending requests without Authorization", t.api_key_env)
        self.client = httpx.Client(
            base_url=t.base_url.rstrip("/"),
            headers=headers,
            timeout=t.timeout_s,
            limits=httpx.Limits(max_connections=t.max_concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=t.max_concurrency, thread_name_prefix="teacher-http")

    def complete(self, rows: list[dict]) -> list[Completion]:
        return list(self.pool.map(self._request, rows))

    def _request(self, row: dict) -> Completion:
        t = self.cfg.teacher
        path, payload = request_payload(t, row["prompt"], row["seed"])
        reason = ""
        for attempt in range(t.max_retries + 1):
            retry_after = None
            try:
                r = self.client.post(path, json=payload)
            except httpx.TimeoutException:
                reason = f"timeout after {t.timeout_s:g} s"
            except httpx.TransportError as e:
                reason = f"connection error: {type(e).__name__}: {e}"
            else:
                if r.status_code == 429 or r.status_code >= 500:
                    reason = f"HTTP {r.status_code}: {r.text[:200]}"
                    retry_after = r.headers.get("retry-after")
                elif r.status_code >= 400:
                    return Completion(error=f"HTTP {r.status_code} (not retried): {r.text[:200]}")
                else:
                    try:
                        return Completion(text=response_text(t.api, r.json()))
                    except ValueError as e:  # includes a body that is not JSON
                        return Completion(error=f"bad response body: {e}")
            if attempt < t.max_retries:
                time.sleep(backoff_delay(attempt, t.backoff_s, retry_after))
        return Completion(error=f"{reason} (gave up after {t.max_retries + 1} attempts)")
