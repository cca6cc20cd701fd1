"""/jobs: queue, list, show, follow and cancel training jobs."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from service.api.deps import ReadSessionDep, SessionDep, SettingsDep
from service.api.routes.events_stream import event_stream
from service.core.config import Settings
from service.core.errors import RequestError, not_found
from service.datasets.store import BUILTIN
from service.jobs import jobstore
from service.jobs.hyperparameters import resolve
from service.jobs.loss_history import job_metrics
from service.jobs.models import (
    Dataset,
    EventsPage,
    Job,
    JobCreate,
    JobEventPublic,
    JobMetrics,
    JobPublic,
    JobsPage,
    JobStatus,
)
from service.llm.modeling import BaseModelRejected, validate_base_model

router = APIRouter(prefix="/jobs", tags=["jobs"])
MAX_ID = 2**63 - 1  # SQL BIGINT: a larger id cannot exist, and binding one would overflow the driver
JobId = Annotated[int, Path(ge=0, le=MAX_ID)]


def to_public(job: Job) -> JobPublic:
    return JobPublic.model_validate(job, from_attributes=True)


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={200: {"model": JobPublic, "description": "an earlier request with this Idempotency-Key"}},
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    job, replayed = queue_job(body, session, settings, idempotency_key)
    if replayed:
        response.status_code = 200
    return to_public(job)


def queue_job(body: JobCreate, session: Session, settings: Settings, idempotency_key: str | None) -> tuple[Job, bool]:
    """Validate and queue a job (committed before returning); ``(job, True)`` replays an Idempotency-Key."""
    request_hash = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        existing = jobstore.find_by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash), True
    queued = session.exec(select(func.count()).select_from(Job).where(Job.status == JobStatus.queued)).one()
    if queued >= settings.max_queued_jobs:  # a bound on what one caller can pile up ahead of everyone else
        raise RequestError(
            429,
            "queue_full",
            f"{queued} jobs are already queued (the limit is "
            f"{settings.max_queued_jobs}); wait for some to finish or cancel some",
        )
    if body.dataset != BUILTIN and session.get(Dataset, body.dataset) is None:
        raise RequestError(
            422,
            "invalid_request",
            f"dataset {body.dataset!r} does not exist",
            [{"field": "dataset", "message": "use 'builtin' or an id from GET /datasets"}],
        )
    try:  # a local path must stay under an allowed root (service/llm/modeling.py)
        base_model = validate_base_model(body.base_model or settings.base_model, settings)
    except BaseModelRejected as exc:
        details = [{"field": "base_model", "message": str(exc)}]
        raise RequestError(422, "invalid_request", f"base_model: {exc}", details) from exc
    job = Job(
        name=body.name,
        base_model=base_model,
        dataset=body.dataset,
        hyperparameters=resolve(body.hyperparameters, base_model).model_dump(),
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    try:
        with session.begin_nested():
            jobstore.create(session, job)
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        existing = jobstore.find_by_idempotency_key(session, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, request_hash), True
    session.commit()  # visible before the 201 goes out
    return job, False


def _replay(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise RequestError(
            422,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request body",
            [{"field": "Idempotency-Key", "message": f"already used for job {job.id}"}],
        )
    return job


@router.get("", response_model=JobsPage)
def list_jobs(
    session: ReadSessionDep,
    status: JobStatus | None = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> JobsPage:
    jobs, has_more = jobstore.list_jobs(session, status, after, limit)
    return JobsPage(
        data=[to_public(j) for j in jobs], has_more=has_more, next_after=jobs[-1].id if has_more and jobs else None
    )


def _job(session: Session, job_id: int) -> Job:
    job = jobstore.get(session, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: JobId, session: ReadSessionDep) -> JobPublic:
    return to_public(_job(session, job_id))


@router.get(
    "/{job_id}/events", response_model=EventsPage, responses={200: {"content": {"text/event-stream": {}}}}
)  # with stream=true: see events_stream.py
def job_events(
    job_id: JobId,
    session: ReadSessionDep,
    request: Request,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: Annotated[bool, Query(description="Server-Sent Events until the job ends")] = False,
    last_event_id: Annotated[str | None, Header(description="resume a stream after this event id")] = None,
) -> EventsPage | StreamingResponse:
    _job(session, job_id)
    if stream:  # see service/api/routes/events_stream.py
        session.close()
        return event_stream(request, job_id, after, last_event_id)
    events, has_more = jobstore.list_events(session, job_id, after, limit)
    return EventsPage(data=[JobEventPublic.model_validate(e, from_attributes=True) for e in events], has_more=has_more)


@router.get("/{job_id}/metrics", response_model=JobMetrics)
def get_job_metrics(
    job_id: JobId,
    session: ReadSessionDep,
    settings: SettingsDep,
    max_points: Annotated[int, Query(ge=10, le=100_000, description="thin train_loss to this many points")] = 2000,
) -> JobMetrics:
    """Training loss by step and held-out loss by epoch, while the job runs and after (the dashboard's chart)."""
    return job_metrics(settings, session, _job(session, job_id), max_points)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: JobId, session: SessionDep) -> JobPublic:
    job = _job(session, job_id)
    try:
        cancelled = jobstore.cancel(session, job_id)
        session.commit()
        return to_public(cancelled)
    except jobstore.TransitionError as exc:
        raise RequestError(
            409, "conflict", f"job {job_id} is {job.status}; only queued or running jobs can be cancelled"
        ) from exc
