"""The job domain's use cases: what the API routes compose (queue a job, find and delete adapters, cancel).

Each is a small keyword-only function over a session and the settings; it refuses a request by raising
``service.core.errors.RequestError`` (the API renders it) and reads or changes state only through
``service.jobs.jobstore`` (the state machine's one owner) and ``service.core.layout`` (the DATA_DIR contract).
No HTTP here: the routes hold the request and response shapes, these functions hold the rules.
"""

from __future__ import annotations

from sqlmodel import Session

from service.core.config import Settings
from service.core.errors import RequestError, not_found
from service.core.layout import AdapterRef, adapter_job_id
from service.jobs import jobstore
from service.jobs.models import Job, JobStatus


# --------------------------------------------------------------------------------------------------- adapters
def adapter_job(*, session: Session, name: str) -> Job:
    """The succeeded job that produced adapter ``name``; 404 when none did (or it was deleted), 409 when its job
    has not succeeded (yet)."""
    job_id = adapter_job_id(name)
    job = jobstore.get(session, job_id) if job_id is not None else None
    if job is None or (job.status == JobStatus.succeeded and job.adapter is None):  # never made, or deleted
        raise not_found("adapter", name)
    if job.status != JobStatus.succeeded or job.adapter != name:
        raise RequestError(409, "adapter_unavailable", f"adapter {name} has no model: its job is {job.status}")
    return job


def resolve_adapter(*, session: Session, settings: Settings, name: str) -> AdapterRef | None:
    """The adapter a request names: 'none' is the base alone (None); 'latest' the newest succeeded adapter on the
    served base; else an adapter name, which must have been trained on the served base."""
    if name == "none":
        return None
    if name == "latest":
        job = jobstore.latest_adapter(session, settings.base_model)
        if job is None or job.adapter is None:
            raise RequestError(
                404,
                "no_adapter",
                "no job has succeeded on this base model yet; use adapter 'none' "
                "for the base model, or queue a job with POST /jobs",
            )
        return settings.layout.adapter(job.adapter)
    job = adapter_job(session=session, name=name)
    if job.base_model != settings.base_model:
        raise RequestError(
            409,
            "base_model_mismatch",
            f"adapter {name} was trained on {job.base_model!r}; this server serves {settings.base_model!r}",
        )
    return settings.layout.adapter(name)
