"""OpenAI-compatible fine-tuning: ``/v1/files`` and ``/v1/fine_tuning/jobs``, a thin layer over the job domain.

The official ``openai`` client can upload a training file, create, follow (retrieve, events, checkpoints) and
cancel a FlashTune job. The objects and the id mapping (``ftjob-<n>`` is job ``<n>``) are in
service/api/schemas/fine_tuning.py; jobs are queued by the same use case as ``POST /jobs``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, UploadFile
from sqlmodel import Session

from service.api.deps import ReadSessionDep, SessionDep, SettingsDep
from service.api.schemas.fine_tuning import (
    FineTuneCreate,
    adapter_checkpoint,
    event_object,
    file_object,
    job_number,
    job_object,
    step_checkpoint,
)
from service.api.uploads import store_upload
from service.core.errors import RequestError, not_found
from service.jobs import commands, jobstore
from service.jobs.models import Job

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/files")
async def upload_file(
    request: Request,
    file: UploadFile,
    session: SessionDep,
    settings: SettingsDep,
    purpose: Annotated[str, Form()] = "fine-tune",
) -> dict[str, Any]:
    if purpose != "fine-tune":
        raise RequestError(422, "invalid_request", "only purpose 'fine-tune' is supported", [{"field": "purpose"}])
    dataset, size = await store_upload(request, file, session, settings)  # streamed, off the loop; 422 if unusable
    session.commit()
    return {**file_object(dataset), "bytes": size}


@router.get("/files/{file_id}")
def get_file(file_id: str, session: ReadSessionDep) -> dict[str, Any]:
    return file_object(commands.get_dataset(session=session, dataset_id=file_id, what="file"))


def _job(session: Session, job_id: str) -> Job:
    """The job of ``ftjob-<n>``; 404 naming it as the client does."""
    number = job_number(job_id)
    job = jobstore.get(session, number) if number is not None else None
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


@router.post("/fine_tuning/jobs")
def create_fine_tune(body: FineTuneCreate, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    if body.validation_file is not None:
        message = "validation_file is not supported: FlashTune holds out validation_fraction of the training file"
        raise RequestError(422, "invalid_request", message, [{"field": "validation_file"}])
    if not commands.dataset_exists(session=session, dataset_id=body.training_file):
        raise RequestError(
            422, "invalid_request", f"training_file {body.training_file!r} does not exist", [{"field": "training_file"}]
        )
    create = body.to_job_create()
    job, _ = commands.queue_job(session=session, settings=settings, body=create, idempotency_key=None)
    return job_object(job)


@router.get("/fine_tuning/jobs")
def list_fine_tunes(
    session: ReadSessionDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    jobs, has_more = jobstore.list_jobs(session, None, job_number(after), limit)
    return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}")
def get_fine_tune(job_id: str, session: ReadSessionDep) -> dict[str, Any]:
    return job_object(_job(session, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_fine_tune(job_id: str, session: SessionDep) -> dict[str, Any]:
    job = _job(session, job_id)
    assert job.id is not None
    return job_object(commands.cancel_job(session=session, job_id=job.id, shown=job_id))


@router.get("/fine_tuning/jobs/{job_id}/events")
def fine_tune_events(
    job_id: str, session: ReadSessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> dict[str, Any]:
    job = _job(session, job_id)
    assert job.id is not None
    events, _ = jobstore.list_events(session, job.id, None, 10_000)
    newest_first = list(reversed(events))
    data = [event_object(e) for e in newest_first[:limit]]
    return {"object": "list", "data": data, "has_more": len(newest_first) > limit}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def fine_tune_checkpoints(job_id: str, session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Complete intermediate checkpoints while the job runs, and the published adapter once it succeeded."""
    job = _job(session, job_id)
    assert job.id is not None
    data = [adapter_checkpoint(job)] if job.adapter else []
    steps = commands.checkpoint_steps(settings=settings, job_id=job.id)
    data += [step_checkpoint(job.id, step, created_at) for step, created_at in steps]
    return {"object": "list", "data": data, "has_more": False, "first_id": None, "last_id": None}
