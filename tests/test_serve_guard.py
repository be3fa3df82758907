"""serve/guard.py without a server: the API key (401) and the body cap (413) come before any route parses a
request; what passes reaches the route unchanged."""

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, Request

from serve.guard import GuardSettings, RequestGuard, key_digest


def guarded_app(settings: GuardSettings | None) -> tuple[FastAPI, list]:
    app = FastAPI()
    app.add_middleware(RequestGuard)
    if settings is not None:
        app.state.guard = settings
    seen: list = []

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        seen.append(body)
        return {"bytes": len(body)}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app, seen


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_without_settings_the_guard_lets_everything_through():
    app, seen = guarded_app(None)
    assert call(app, "POST", "/echo", content=b"x" * 5000).json() == {"bytes": 5000}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2VjcmV0"},
                                     {"Authorization": "secret"}, {"Authorization": "Bearer "}])
def test_a_missing_or_wrong_key_is_a_401_and_the_route_never_runs(headers):
    app, seen = guarded_app(GuardSettings(max_body_bytes=1000, api_key_sha256=key_digest("secret")))
    resp = call(app, "POST", "/echo", content=b"{}", headers=headers)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    error = resp.json()["error"]
    assert error["type"] == "authentication_error" and "Authorization: Bearer" in error["message"]
    assert seen == []


def test_the_right_key_passes_and_healthz_needs_none():
    app, seen = guarded_app(GuardSettings(max_body_bytes=1000, api_key_sha256=key_digest("secret")))
    assert call(app, "POST", "/echo", content=b"abc", headers={"Authorization": "Bearer secret"}).json() == {
        "bytes": 3}
    assert call(app, "GET", "/healthz").status_code == 200
    assert seen == [b"abc"]


def test_healthz_is_open_under_a_route_prefix_too():
    """Behind Serve's route_prefix the scope's path carries the prefix (root_path): /prefix/healthz is open."""
    app, _ = guarded_app(GuardSettings(max_body_bytes=1000, api_key_sha256=key_digest("secret")))
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    for path, status in (("/keyed/healthz", 200), ("/keyed/echo", 401)):
        sent.clear()
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "/keyed", "headers": [],
                 "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80),
                 "client": ("c", 1)}
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] == status, path


def test_a_body_over_the_cap_is_a_413_by_its_declared_length():
    app, seen = guarded_app(GuardSettings(max_body_bytes=100))
    resp = call(app, "POST", "/echo", content=b"x" * 101)
    assert resp.status_code == 413 and "serve.max_body_bytes (100 bytes)" in resp.json()["error"]["message"]
    assert call(app, "POST", "/echo", content=b"x" * 100).json() == {"bytes": 100} and seen == [b"x" * 100]


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_cap():
    """No Content-Length (chunked): the guard counts what it reads, stops reading past the cap, answers 413."""
    app, seen = guarded_app(GuardSettings(max_body_bytes=100))
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"y" * 40, "more_body": True}  # an endless body

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": [], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and len(reads) == 3  # 120 bytes read: one message past the cap, no more
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large" and seen == []
