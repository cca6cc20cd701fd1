"""Dependencies as ``Annotated`` aliases: settings, database session, model server, API key check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Request
from sqlmodel import Session

from service.api.security import ApiKeyConfigError, bearer_ok
from service.core.config import Settings
from service.core.errors import RequestError
from service.jobs.db import session_scope
from service.serving.engine import ModelServer


# The dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread of its
# pool, a thread hop (and a GIL hand-over) per dependency per request, measured as most of what /analyze cost besides
# the model (bench/http_latency.py --stub-model).
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SESSION_THREADS = 512


def _ensure_session_threads() -> None:
    # A request holds its transaction (on SQLite: the write lock, BEGIN IMMEDIATE) until its session dependency
    # exits, after the response is serialized, which for a sync endpoint needs a threadpool thread. With anyio's
    # default 40 threads, 40 requests waiting for the lock (or a pooled connection) starve the lock holder: a
    # deadlock until the 30 s busy timeout ("database is locked"). So: more threads than concurrent requests in
    # practice, and the commit runs on the event loop (async dependency), needing no thread at all.
    limiter = anyio.to_thread.current_default_thread_limiter()
    if limiter.total_tokens < SESSION_THREADS:
        limiter.total_tokens = SESSION_THREADS


async def get_session(request: Request) -> AsyncIterator[Session]:
    _ensure_session_threads()
    with session_scope(request.app.state.engine) as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[Session]:
    """For handlers that only read: never waits for SQLite's write lock (service/jobs/db.py)."""
    _ensure_session_threads()
    with session_scope(request.app.state.engine, read_only=True) as session:
        yield session


async def get_model_server(request: Request) -> ModelServer:
    server: ModelServer = request.app.state.model_server
    return server


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
ModelServerDep = Annotated[ModelServer, Depends(get_model_server)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With FLASHTUNE_API_KEY (or _FILE) set, require ``Authorization: Bearer <key>`` (constant-time comparison; the
    key file is stat'ed, and read again only when it changed: no I/O worth a thread)."""
    if not settings.auth_enabled:
        return
    try:
        allowed = bearer_ok(settings, request.headers.get("authorization", ""))
    except ApiKeyConfigError as exc:  # fail closed: a broken key file locks the API, it never opens it
        raise RequestError(503, "auth_unavailable", str(exc)) from exc
    if not allowed:
        raise RequestError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
