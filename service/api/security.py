"""Request hardening in one ASGI middleware, plus the API-key set and the documented error responses.

The middleware runs before routing and before any body is read:

* every response carries ``X-Request-ID`` (the client's own, if it is a short safe token, else a new one), so a
  report about any response can be matched with the server's log;
* a request whose ``Content-Length`` is over its route's limit is answered 413 without reading the body; a body
  without a length (chunked) is counted as it streams and stopped with 413 at the limit, so nothing over the limit
  is ever held in memory or spooled to disk;
* an optional token-bucket rate limit on ``/analyze`` and ``/analyze/batch`` (off by default) answers 429 with
  ``Retry-After``.

It is a plain ASGI middleware rather than ``BaseHTTPMiddleware`` so that streaming responses (SSE, downloads)
pass through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.config import Settings
from service.core.logs import request_id_var

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: ASCII only, no trailing newline
RATE_LIMITED_PATHS = ("/analyze", "/analyze/batch")
SCHEMA_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # behind the key when one is set
MULTIPART_SLACK = 1024 * 1024  # form boundaries and fields around an upload of exactly max_upload_bytes
UPLOAD_PATHS = ("/datasets", "/v1/files")  # dataset uploads: FLASHTUNE_MAX_UPLOAD_BYTES, not MAX_BODY_BYTES
DECIMAL = re.compile(r"[0-9]{1,19}")  # a number as a header or an id carries it: ASCII digits, nothing else


# ------------------------------------------------------------------------------------------- documented errors
class ErrorBody(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. not_found, invalid_request, unauthorized")
    message: str
    details: Any = Field(default=None, description="for invalid input: the fields (or lines) at fault")


class ErrorResponse(BaseModel):
    """The one error shape of every non-2xx response."""

    error: ErrorBody


_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing or wrong API key",
    404: "No such resource",
    409: "The resource is not in a state that allows this",
    413: "Request body over this route's limit",
    422: "Invalid input: the details name the fields at fault",
    429: "Rate limited: retry after Retry-After seconds",
    503: "Unavailable: the API key file cannot be read, the base model cannot be loaded, or the server is not ready",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for routers, so the published schema documents the errors the API really sends."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


# --------------------------------------------------------------------------------------------------------- ids
CANONICAL_ID = re.compile(r"0|[1-9][0-9]{0,18}")


def canonical_id(value: object) -> object:
    """A numeric id as a path carries it must be written one way only (``12``): pydantic would also read ``1_2``,
    `` 12``, ``+12`` and ``012`` as 12, so other spellings would name the same object. Use as
    ``Annotated[int, Path(...), BeforeValidator(canonical_id)]`` (in this order, or FastAPI publishes
    ``ge``/``le`` instead of ``minimum``/``maximum``)."""
    if isinstance(value, str) and not CANONICAL_ID.fullmatch(value):
        raise ValueError("must be a whole number written with the digits 0-9, without sign, spaces or leading zeros")
    return value


# ------------------------------------------------------------------------------------------------------ API keys
_key_cache: dict[Path, tuple[float, tuple[str, ...]]] = {}
_key_lock = threading.Lock()


class ApiKeyConfigError(Exception):
    """FLASHTUNE_API_KEY_FILE is set but cannot be read or holds no key."""


def _read_key_file(path: Path) -> tuple[str, ...]:
    try:
        mtime = path.stat().st_mtime
        with _key_lock:
            cached = _key_cache.get(path)
            if cached and cached[0] == mtime:
                return cached[1]
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyConfigError(f"cannot read FLASHTUNE_API_KEY_FILE: {type(exc).__name__}") from exc
    keys = tuple(k for k in (line.strip() for line in lines) if k and not k.startswith("#"))
    if not keys:
        raise ApiKeyConfigError("FLASHTUNE_API_KEY_FILE holds no key (one key per line; '#' starts a comment)")
    with _key_lock:
        _key_cache[path] = (mtime, keys)
    return keys


def api_keys(settings: Settings) -> tuple[str, ...]:
    """Every accepted key: FLASHTUNE_API_KEY plus each line of FLASHTUNE_API_KEY_FILE.

    The file is re-read when its modification time changes, so keys can be rotated without a restart.
    """
    keys: tuple[str, ...] = (settings.api_key,) if settings.api_key else ()
    if settings.api_key_file is not None:
        keys += _read_key_file(settings.api_key_file)
    return keys


def bearer_ok(settings: Settings, authorization: str) -> bool:
    """Whether an ``Authorization`` header carries an accepted key (raises ApiKeyConfigError: fail closed).

    Every key is compared in constant time and without stopping at a match, so the time taken says nothing
    about which key, or how much of one, matched.
    """
    keys = api_keys(settings)
    scheme, _, token = authorization.partition(" ")
    presented = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    return scheme.lower() == "bearer" and matched


# ---------------------------------------------------------------------------------------------------- body size
def body_limit(method: str, path: str, settings: Settings) -> int:
    """The largest request body accepted on a route, in bytes."""
    if method == "POST" and path.rstrip("/") in UPLOAD_PATHS:
        return settings.max_upload_bytes + MULTIPART_SLACK
    if path == "/analyze":
        return settings.max_analyze_body_bytes
    return settings.max_body_bytes


class BodyTooLarge(HTTPException):
    """Raised from the counting ``receive`` when a streamed body passes its limit (FastAPI re-raises it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this route's limit of {limit} bytes")


# --------------------------------------------------------------------------------------------------- rate limit
class RateLimiter:
    """Token buckets per client: ``per_minute`` requests on average, bursts of up to ``burst``."""

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(max(burst, 1))
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, updated)
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, updated = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - updated) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_clients:  # forget the least recently seen client
                self._buckets.popitem(last=False)
            return wait


def client_identity(scope: Scope) -> str:
    """The API key (hashed, never kept in clear) when one is sent, else the client address."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return "key:" + hashlib.sha256(value).hexdigest()[:32]
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "ip:unknown"


# --------------------------------------------------------------------------------------------------- middleware
def _error(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message}}, status_code=status, headers=headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        per_minute = settings.analyze_rate_limit_per_minute
        self.limiter = RateLimiter(per_minute, settings.analyze_rate_limit_burst) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        # Every log record of this request carries the id (service/core/logs.py). The server runs each request in a task
        # of its own, whose context dies with it, so the id is not reset: the 500 handler, which runs outside this
        # middleware, and the server's access line still see it.
        request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:  # a 500 already carries the id it was logged with
                    headers.append("X-Request-ID", request_id)
            await send(message)

        rejection = self._reject(scope)
        if rejection is not None:
            await rejection(scope, receive, send_with_id)
            return
        limit = body_limit(scope["method"], scope["path"], self.settings)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send_with_id)

    def _reject(self, scope: Scope) -> JSONResponse | None:
        """A response for requests refused before the app sees them: bad or too large length, rate limit."""
        length = _header(scope, b"content-length")
        if length is not None:
            if not DECIMAL.fullmatch(length.strip()):  # ASCII digits only: int() would also read "١٢" as 12
                return _error(400, "invalid_request", "Content-Length is not a number")
            limit = body_limit(scope["method"], scope["path"], self.settings)
            if int(length) > limit:
                return _error(413, "too_large", f"the request body is over this route's limit of {limit} bytes")
        if scope["path"] in SCHEMA_PATHS and self.settings.auth_enabled:
            try:
                allowed = bearer_ok(self.settings, _header(scope, b"authorization") or "")
            except ApiKeyConfigError as exc:
                return _error(503, "auth_unavailable", str(exc))
            if not allowed:
                return _error(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
        if self.limiter is not None and scope["path"] in RATE_LIMITED_PATHS:
            wait = self.limiter.take(client_identity(scope))
            if wait > 0:
                retry = str(max(1, math.ceil(wait)))
                return _error(429, "rate_limited", f"too many requests; retry after {retry} s", {"Retry-After": retry})
        return None


def install(app: FastAPI, settings: Settings) -> None:
    """Add the middleware and the handlers for the errors it and the model loader raise."""
    from service.llm.modeling import ModelLoadError
    from service.serving.adapters import UnsafeAdapterError

    app.add_middleware(SecurityMiddleware, settings=settings)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, "too_large", str(exc.detail))

    @app.exception_handler(ModelLoadError)
    async def _model_unavailable(_request: Request, exc: ModelLoadError) -> JSONResponse:
        """The served base cannot be loaded: a generic message and what to change; the reason is in the log."""
        return _error(503, "model_unavailable", f"{exc}; {exc.hint}")

    @app.exception_handler(UnsafeAdapterError)
    async def _unsafe_adapter(_request: Request, exc: UnsafeAdapterError) -> JSONResponse:
        return _error(409, "unsafe_adapter", str(exc))
