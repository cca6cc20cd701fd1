"""Server-Sent Events for ``GET /jobs/{id}/events?stream=true`` (the route, in routes/jobs.py, hands over here).

Each job event goes out as one SSE message: ``id`` is the event id (so a reconnecting client's
``Last-Event-ID`` header resumes right after it), ``data`` the event as JSON, the same shape as in
``GET /jobs/{id}/events``. When the job has reached a final state and every event is out, a last
message with ``event: end`` and ``data: {"status": ...}`` says so and the stream closes; an
``EventSource`` should close itself on it rather than reconnect. A comment line goes out when nothing
has happened for a while, so proxies keep the connection open.

The database is polled (``POLL_SECONDS``) from a worker thread through ``run_in_threadpool``: the
workers write events from other processes, so there is nothing in this process to wait on, and the
event loop never blocks on the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from service.api.schemas.jobs import JobEventPublic
from service.core.errors import RequestError
from service.jobs import jobstore
from service.jobs.db import session_scope
from service.jobs.models import MAX_ID, Job, JobStatus

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
BATCH = 500
FINAL = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


def parse_last_event_id(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    text = value.strip()
    # ASCII digits only: int() would also read '١' (an Arabic-Indic one), '1_0' or '+1'
    parsed = int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else -1  # the schema's pattern
    if not 0 <= parsed <= MAX_ID:
        raise RequestError(
            422,
            "invalid_request",
            "Last-Event-ID must be an event id (a whole number >= 0)",
            [{"field": "Last-Event-ID", "message": f"got {value!r}"}],
        )
    return parsed


def _poll(engine: Engine, job_id: int, after: int | None) -> tuple[str | None, list[dict[str, Any]], bool]:
    """The job's status, then its events after ``after``: reading the status first means that, once it is final,
    the events written with the final transition (same transaction) are already visible to the second read."""
    with session_scope(engine, read_only=True) as session:
        job = session.get(Job, job_id)
        status = job.status if job is not None else None
        events, has_more = jobstore.list_events(session, job_id, after, BATCH)
        data = [JobEventPublic.of(e).model_dump(mode="json") for e in events]
    return status, data, has_more


def _message(event: dict[str, Any]) -> str:
    return f"id: {event['id']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


async def _stream(request: Request, engine: Engine, job_id: int, after: int | None) -> AsyncIterator[str]:
    yield f"retry: {int(POLL_SECONDS * 2000)}\n\n"  # how long a browser waits before it reconnects
    quiet_since = time.monotonic()
    while True:
        status, events, has_more = await run_in_threadpool(_poll, engine, job_id, after)
        for event in events:
            yield _message(event)
            after = event["id"]
        if events:
            quiet_since = time.monotonic()
        if status is None or (status in FINAL and not has_more):
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if has_more:
            continue
        if time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            quiet_since = time.monotonic()
        if await request.is_disconnected():
            return
        await anyio.sleep(POLL_SECONDS)


def event_stream(request: Request, job_id: int, after: int | None, last_event_id: str | None) -> StreamingResponse:
    """The SSE response; ``Last-Event-ID`` (a reconnect) wins over the ``after`` query parameter."""
    resume = parse_last_event_id(last_event_id)
    start = resume if resume is not None else after
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no buffering in nginx and friends
    return StreamingResponse(
        _stream(request, request.app.state.engine, job_id, start), media_type="text/event-stream", headers=headers
    )
