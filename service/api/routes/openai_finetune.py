"""OpenAI-compatible fine-tuning: ``/v1/files`` and ``/v1/fine_tuning/jobs``, a thin layer over the job store.

The official ``openai`` client can upload a training file, create, follow (retrieve, events, checkpoints) and
cancel a FlashTune job. Ids map one to one: file ``ds-…`` is the dataset, job ``ftjob-<n>`` is job ``<n>``,
and ``fine_tuned_model`` is the adapter name that ``/v1/chat/completions`` accepts as ``model``. FlashTune's
status names are OpenAI's (queued, running, succeeded, failed, cancelled).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import ReadSessionDep, SessionDep, SettingsDep
from service.api.routes.jobs import queue_job
from service.core.errors import RequestError, not_found
from service.core.layout import checkpoint_step, complete_checkpoints
from service.datasets.formats import DatasetError
from service.datasets.store import BUILTIN, save_upload
from service.jobs import jobstore
from service.jobs.hyperparameters import resolve
from service.jobs.models import Dataset, Hyperparameters, Job, JobCreate, JobStatus

router = APIRouter(prefix="/v1", tags=["openai"])
JOB_PREFIX = "ftjob-"


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def _file(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.id,
        "object": "file",
        "bytes": dataset.stats.get("bytes", 0),
        "created_at": _ts(dataset.created_at),
        "filename": dataset.filename or dataset.id,
        "purpose": "fine-tune",
        "status": "processed",
    }


@router.post("/files")
async def upload_file(
    file: UploadFile, session: SessionDep, settings: SettingsDep, purpose: Annotated[str, Form()] = "fine-tune"
) -> dict[str, Any]:
    if purpose != "fine-tune":
        raise RequestError(422, "invalid_request", "only purpose 'fine-tune' is supported", [{"field": "purpose"}])
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise RequestError(413, "too_large", f"the file is over the upload limit of {settings.max_upload_bytes} bytes")
    try:
        dataset = await run_in_threadpool(save_upload, settings, session, data, file.filename, None, None)
    except DatasetError as exc:
        raise RequestError(422, "invalid_dataset", str(exc), exc.details) from exc
    session.commit()
    return {**_file(dataset), "bytes": len(data)}


@router.get("/files/{file_id}")
def get_file(file_id: str, session: ReadSessionDep) -> dict[str, Any]:
    dataset = session.get(Dataset, file_id)
    if dataset is None:
        raise not_found("file", file_id)
    return _file(dataset)


class FineTuneHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | str | None = None  # "auto" or a number
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None


class FineTuneCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = None
    hyperparameters: FineTuneHyperparameters = Field(default_factory=FineTuneHyperparameters)
    suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


def _number(value: Any, field: str) -> Any:
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        raise RequestError(422, "invalid_request", f"{field} must be a number or 'auto'", [{"field": field}])
    return value


def _to_openai(job: Job) -> dict[str, Any]:
    hp = job.hyperparameters
    base_lr = resolve(Hyperparameters(), job.base_model).learning_rate
    error = job.error if job.status == JobStatus.failed else None
    eta = job.progress.get("eta_seconds") if job.status == JobStatus.running else None
    return {
        "id": f"{JOB_PREFIX}{job.id}",
        "object": "fine_tuning.job",
        "created_at": _ts(job.created_at),
        "finished_at": _ts(job.finished_at),
        "model": job.base_model,
        "fine_tuned_model": job.adapter,
        "organization_id": "flashtune",
        "status": job.status,
        "training_file": job.dataset,
        "validation_file": None,
        "hyperparameters": {
            "n_epochs": hp["epochs"],
            "batch_size": hp["batch_size"],
            "learning_rate_multiplier": round(hp["learning_rate"] / base_lr, 6),
        },
        "result_files": [],
        "trained_tokens": None,
        "seed": hp["seed"],
        "integrations": [],
        "estimated_finish": int(datetime.now().timestamp() + eta) if eta else None,
        "error": {"code": error["type"], "message": error["message"], "param": None} if error else None,
        "user_provided_suffix": job.name,
    }


def _job(session: Session, job_id: str) -> Job:
    number = job_id.removeprefix(JOB_PREFIX)
    job = jobstore.get(session, int(number)) if number.isdigit() and len(number) < 19 else None
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


@router.post("/fine_tuning/jobs")
def create_fine_tune(body: FineTuneCreate, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    if body.validation_file is not None:
        message = "validation_file is not supported: FlashTune holds out validation_fraction of the training file"
        raise RequestError(422, "invalid_request", message, [{"field": "validation_file"}])
    if body.training_file != BUILTIN and session.get(Dataset, body.training_file) is None:
        raise RequestError(
            422, "invalid_request", f"training_file {body.training_file!r} does not exist", [{"field": "training_file"}]
        )
    hp = body.hyperparameters
    multiplier = _number(hp.learning_rate_multiplier, "hyperparameters.learning_rate_multiplier")
    base_lr = resolve(Hyperparameters(), body.model).learning_rate
    hyper = Hyperparameters(
        epochs=_number(hp.n_epochs, "hyperparameters.n_epochs"),
        batch_size=_number(hp.batch_size, "hyperparameters.batch_size"),
        learning_rate=base_lr * multiplier if multiplier else None,
        seed=body.seed,
    )
    create = JobCreate(dataset=body.training_file, base_model=body.model, name=body.suffix, hyperparameters=hyper)
    job, _ = queue_job(create, session, settings, None)  # the same path as POST /jobs
    return _to_openai(job)


@router.get("/fine_tuning/jobs")
def list_fine_tunes(
    session: ReadSessionDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    number = (after or "").removeprefix(JOB_PREFIX)
    after_id = int(number) if number.isdigit() and len(number) < 19 else None
    jobs, has_more = jobstore.list_jobs(session, None, after_id, limit)
    return {"object": "list", "data": [_to_openai(j) for j in jobs], "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}")
def get_fine_tune(job_id: str, session: ReadSessionDep) -> dict[str, Any]:
    return _to_openai(_job(session, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_fine_tune(job_id: str, session: SessionDep) -> dict[str, Any]:
    job = _job(session, job_id)
    assert job.id is not None
    try:
        cancelled = jobstore.cancel(session, job.id)
    except jobstore.TransitionError as exc:
        raise RequestError(409, "conflict", f"job {job_id} is {job.status}; it cannot be cancelled") from exc
    session.commit()
    return _to_openai(cancelled)


@router.get("/fine_tuning/jobs/{job_id}/events")
def fine_tune_events(
    job_id: str, session: ReadSessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> dict[str, Any]:
    job = _job(session, job_id)
    assert job.id is not None
    events, _ = jobstore.list_events(session, job.id, None, 10_000)
    newest_first = list(reversed(events))
    data = [
        {
            "id": f"ftevent-{e.id}",
            "object": "fine_tuning.job.event",
            "created_at": _ts(e.created_at),
            "level": e.level,
            "message": e.message,
            "type": "message",
            "data": e.data,
        }
        for e in newest_first[:limit]
    ]
    return {"object": "list", "data": data, "has_more": len(newest_first) > limit}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def fine_tune_checkpoints(job_id: str, session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Complete intermediate checkpoints while the job runs, and the published adapter once it succeeded."""
    job = _job(session, job_id)
    data = []
    if job.adapter:
        data.append(
            {
                "id": f"ftckpt-{job.id}-final",
                "object": "fine_tuning.job.checkpoint",
                "created_at": _ts(job.finished_at),
                "fine_tuned_model_checkpoint": job.adapter,
                "fine_tuning_job_id": f"{JOB_PREFIX}{job.id}",
                "step_number": job.progress.get("step", 0),
                "metrics": {"train_loss": job.progress.get("loss")},
            }
        )
    assert job.id is not None
    for path in reversed(complete_checkpoints(settings.layout.job_dir(job.id))):
        step = checkpoint_step(path)
        data.append(
            {
                "id": f"ftckpt-{job.id}-{step}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": int(path.stat().st_mtime),
                "fine_tuned_model_checkpoint": None,
                "fine_tuning_job_id": f"{JOB_PREFIX}{job.id}",
                "step_number": step,
                "metrics": {},
            }
        )
    return {"object": "list", "data": data, "has_more": False, "first_id": None, "last_id": None}
