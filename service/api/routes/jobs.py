"""/jobs: queue, list, show, follow and cancel training jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from service.api.deps import ReadSessionDep, SessionDep, SettingsDep
from service.api.events import event_stream
from service.api.schemas.jobs import EventsPage, JobEventPublic, JobPublic, JobsPage
from service.api.security import canonical_id
from service.jobs import commands, jobstore
from service.jobs.loss_history import job_metrics
from service.jobs.models import MAX_ID, JobCreate, JobMetrics, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobId = Annotated[int, Path(ge=0, le=MAX_ID), BeforeValidator(canonical_id)]  # "12" only, not "1_2" or "012"


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
    job, replayed = commands.queue_job(session=session, settings=settings, body=body, idempotency_key=idempotency_key)
    if replayed:
        response.status_code = 200
    return JobPublic.of(job)


@router.get("", response_model=JobsPage)
def list_jobs(
    session: ReadSessionDep,
    status: JobStatus | None = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> JobsPage:
    jobs, has_more = jobstore.list_jobs(session, status, after, limit)
    return JobsPage(
        data=[JobPublic.of(j) for j in jobs], has_more=has_more, next_after=jobs[-1].id if has_more and jobs else None
    )


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: JobId, session: ReadSessionDep) -> JobPublic:
    return JobPublic.of(commands.get_job(session=session, job_id=job_id))


@router.get(
    "/{job_id}/events", response_model=EventsPage, responses={200: {"content": {"text/event-stream": {}}}}
)  # with stream=true: see service/api/events.py
def job_events(
    job_id: JobId,
    session: ReadSessionDep,
    request: Request,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: Annotated[bool, Query(description="Server-Sent Events until the job ends")] = False,
    # a string, not str | None: a header is never null (a fuzzer would send the word "null")
    last_event_id: Annotated[
        str, Header(description="resume a stream after this event id", pattern=r"^[0-9]{0,18}$")
    ] = "",
) -> EventsPage | StreamingResponse:
    commands.get_job(session=session, job_id=job_id)
    if stream:
        session.close()  # the stream polls with sessions of its own
        return event_stream(request, job_id, after, last_event_id)
    events, has_more = jobstore.list_events(session, job_id, after, limit)
    return EventsPage(data=[JobEventPublic.of(e) for e in events], has_more=has_more)


@router.get("/{job_id}/metrics", response_model=JobMetrics)
def get_job_metrics(
    job_id: JobId,
    session: ReadSessionDep,
    settings: SettingsDep,
    max_points: Annotated[int, Query(ge=10, le=100_000, description="thin train_loss to this many points")] = 2000,
) -> JobMetrics:
    """Training loss by step and held-out loss by epoch, while the job runs and after (the dashboard's chart)."""
    return job_metrics(settings, session, commands.get_job(session=session, job_id=job_id), max_points)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: JobId, session: SessionDep) -> JobPublic:
    return JobPublic.of(commands.cancel_job(session=session, job_id=job_id))
