"""What a request must pass before any route parses it: the API key (401) and the body cap (413).

A plain ASGI middleware (no Ray, no torch), so it is tested without a server; its refusals are
``schemas.error_body``'s, like every other of the server's. Its settings live on the ASGI
app's ``state.guard`` (a :class:`GuardSettings`), which the deployment sets when its replica starts: the app
object is shared by the replica's routes, and the middleware reads it per request.

The key never reaches a replica: the driver passes its SHA-256, and a request's bearer token is hashed and
compared in constant time (``hmac.compare_digest``). ``/healthz`` answers without a key (liveness probes).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from serve.schemas import error_body

API_KEY_ENV = "QCRD_SERVE_API_KEY"  # where `qcrd serve` and `serve.app:build_app` read the key by default
OPEN_PATHS = frozenset({"/healthz"})


def key_digest(api_key: str | None) -> str | None:
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


@dataclass(frozen=True)
class GuardSettings:
    max_body_bytes: int
    api_key_sha256: str | None = None  # None: no key required


class RequestGuard:
    """ASGI middleware: a wrong or missing ``Authorization: Bearer`` key gets a 401 and a body over the cap a 413
    (by its Content-Length at once, else as soon as the bytes read pass the cap); only then the app sees it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        settings: GuardSettings | None = getattr(getattr(scope.get("app"), "state", None), "guard", None)
        if scope["type"] != "http" or settings is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        path = scope.get("path", "")
        root = scope.get("root_path", "")  # an app under a route prefix (Serve's route_prefix) sees its own paths
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if settings.api_key_sha256 and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()) or "",
                                                                      settings.api_key_sha256):
                return await _refuse(send, 401, "a valid API key is required: Authorization: Bearer <key>",
                                     "invalid_api_key", {b"www-authenticate": b"Bearer"})
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return await _refuse(send, 413, _too_large(settings), "request_too_large")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body, more, size = [], True, 0
            while more:  # capped: at most max_body_bytes (plus one message) is ever held
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > settings.max_body_bytes:
                    return await _refuse(send, 413, _too_large(settings), "request_too_large")
                body.append(chunk)
                more = message.get("more_body", False)
            receive = _replay(b"".join(body), receive)
        return await self.app(scope, receive, send)


def _too_large(settings: GuardSettings) -> str:
    return f"request body over serve.max_body_bytes ({settings.max_body_bytes} bytes)"


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, as the app would see it

    return replayed


async def _refuse(send, status: int, message: str, code: str, extra_headers: dict | None = None) -> None:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = json.dumps(error_body(message, kind=kind, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += list((extra_headers or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
