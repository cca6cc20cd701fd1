"""OpenAI-compatible fine-tuning: ``/v1/files`` and ``/v1/fine_tuning/jobs``, a thin layer over the job domain.

The official ``openai`` client can upload, list, retrieve, download and delete training files, and create, list,
follow (retrieve, events, checkpoints) and cancel a FlashTune job; every list pages with ``after`` and ``limit`` to
its end, as the client's auto-pagination expects. A succeeded job's ``result_files`` names its metrics
(``ftjob-<n>-results``: ``files.retrieve`` and ``files.content`` read it; it goes with the adapter). The objects and
the id mapping (``ftjob-<n>`` is job ``<n>``) are in service/api/schemas/fine_tuning.py; jobs are queued by the same
use case as ``POST /jobs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from sqlmodel import Session

from service.api.deps import ReadSessionDep, SessionDep, SettingsDep
from service.api.schemas.fine_tuning import (
    RESULTS_FILENAME,
    FineTuneCreate,
    adapter_checkpoint,
    event_number,
    event_object,
    file_object,
    job_number,
    job_object,
    metrics_csv,
    results_file_object,
    results_job,
    step_checkpoint,
)
from service.api.uploads import store_upload
from service.core.config import Settings
from service.core.errors import RequestError, not_found
from service.datasets.store import original_path, stored_size
from service.jobs import commands, jobstore
from service.jobs.models import Job, JobStatus

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/files")
async def upload_file(
    request: Request,
    file: UploadFile,
    session: SessionDep,
    settings: SettingsDep,
    purpose: Annotated[str, Form(json_schema_extra={"enum": ["fine-tune"]})] = "fine-tune",
) -> dict[str, Any]:
    if purpose != "fine-tune":
        raise RequestError(422, "invalid_request", "only purpose 'fine-tune' is supported", [{"field": "purpose"}])
    dataset, size = await store_upload(request, file, session, settings)  # streamed, off the loop; 422 if unusable
    session.commit()
    return file_object(dataset, size)


@router.get("/files")
def list_files(
    session: ReadSessionDep,
    settings: SettingsDep,
    after: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    purpose: Annotated[str | None, Query(max_length=64, json_schema_extra={"enum": ["fine-tune"]})] = None,
) -> dict[str, Any]:
    """The uploaded training files, newest first (``order=asc``: oldest first)."""
    if purpose not in (None, "fine-tune"):
        message = "only uploaded files (purpose 'fine-tune') are listed; a job's results file is in its result_files"
        raise RequestError(400, "unsupported_parameter", message, [{"field": "purpose"}])
    rows, has_more = commands.dataset_page(session=session, after=after, limit=limit, newest_first=order == "desc")
    data = [file_object(d, stored_size(settings, d.id)) for d in rows]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last}


def _results(session: Session, settings: Settings, file_id: str) -> tuple[Job, str] | None:
    """The job and metrics CSV of a results file id; None when ``file_id`` is no results file id; 404 when the
    job has no published adapter (not succeeded, or its adapter was deleted)."""
    number = results_job(file_id)
    if number is None:
        return None
    job = jobstore.get(session, number)
    if job is None or job.status != JobStatus.succeeded or not job.adapter:
        raise not_found("file", file_id)
    _, info = commands.adapter_contents(settings=settings, name=job.adapter)
    return job, metrics_csv(info.get("losses", {}))


@router.get("/files/{file_id}")
def get_file(file_id: str, session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    results = _results(session, settings, file_id)
    if results is not None:
        job, csv = results
        return results_file_object(job, len(csv.encode()))
    dataset = commands.get_dataset(session=session, dataset_id=file_id, what="file")
    return file_object(dataset, stored_size(settings, dataset.id))


CONTENT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}, "text/csv": {}}, "description": "the file's bytes"}
}


@router.get("/files/{file_id}/content", response_model=None, responses=CONTENT)
def get_file_content(file_id: str, session: ReadSessionDep, settings: SettingsDep) -> Response:
    """The file as uploaded, or a results file's CSV."""
    results = _results(session, settings, file_id)
    if results is not None:
        headers = {"Content-Disposition": f'attachment; filename="{RESULTS_FILENAME}"'}
        return Response(results[1], media_type="text/csv; charset=utf-8", headers=headers)
    dataset = commands.get_dataset(session=session, dataset_id=file_id, what="file")
    path = original_path(settings, dataset.id)
    if not path.is_file():
        raise not_found("file content of", file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=dataset.filename or dataset.id)


@router.delete("/files/{file_id}")
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """An uploaded file and its dataset; 409 while a queued or running job uses it."""
    if results_job(file_id) is not None:
        message = "a results file goes with its adapter: DELETE /adapters/{name} removes both"
        raise RequestError(400, "unsupported_parameter", message, [{"field": "file_id"}])
    commands.delete_dataset(session=session, settings=settings, dataset_id=file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def _job(session: Session, job_id: str) -> Job:
    """The job of ``ftjob-<n>``; 404 naming it as the client does."""
    number = job_number(job_id)
    job = jobstore.get(session, number) if number is not None else None
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


@router.post("/fine_tuning/jobs")
def create_fine_tune(body: FineTuneCreate, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    body.check()
    for field, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        if file_id is not None and not commands.dataset_exists(session=session, dataset_id=file_id):
            raise RequestError(422, "invalid_request", f"{field} {file_id[:64]!r} does not exist", [{"field": field}])
    create = body.to_job_create()
    job, _ = commands.queue_job(session=session, settings=settings, body=create, idempotency_key=None)
    return job_object(job)


def _cursor(after: str | None, parse: Callable[[str], int | None], shape: str) -> int | None:
    """The id an ``after`` cursor names; 422 naming ``after`` when it names none."""
    if after is None:
        return None
    number = parse(after)
    if number is None:
        raise RequestError(422, "invalid_request", f"after must be an id like {shape}", [{"field": "after"}])
    return number


@router.get("/fine_tuning/jobs")
def list_fine_tunes(
    session: ReadSessionDep,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^(ftjob-)?(0|[1-9][0-9]{0,17})$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """Newest first; ``after``: the last job of the previous page."""
    jobs, has_more = jobstore.list_jobs(session, None, _cursor(after, job_number, "ftjob-12"), limit)
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
    job_id: str,
    session: ReadSessionDep,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^ftevent-(0|[1-9][0-9]{0,17})$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    """Newest first, as OpenAI lists them; ``after``: the last event of the previous page (older ones follow)."""
    job = _job(session, job_id)
    assert job.id is not None
    before = _cursor(after, event_number, "ftevent-12")
    events, has_more = jobstore.list_events_newest_first(session, job.id, before, limit)
    return {"object": "list", "data": [event_object(e) for e in events], "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def fine_tune_checkpoints(job_id: str, session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Complete intermediate checkpoints while the job runs, and the published adapter once it succeeded."""
    job = _job(session, job_id)
    assert job.id is not None
    data = [adapter_checkpoint(job)] if job.adapter else []
    steps = commands.checkpoint_steps(settings=settings, job_id=job.id)
    data += [step_checkpoint(job.id, step, created_at) for step, created_at in steps]
    return {"object": "list", "data": data, "has_more": False, "first_id": None, "last_id": None}
