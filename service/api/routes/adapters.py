"""/adapters: the adapters of succeeded jobs, their files and metrics, and a download of each."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlmodel import Session

from service.api.deps import ModelServerDep, ReadSessionDep, SessionDep, SettingsDep
from service.core.config import Settings
from service.core.errors import RequestError, not_found
from service.core.layout import adapter_job_id
from service.core.training_info import read_training_info
from service.jobs import jobstore
from service.jobs.models import AdapterPublic, Job, JobStatus

router = APIRouter(prefix="/adapters", tags=["adapters"])


def adapter_job(session: Session, name: str) -> Job:
    """The succeeded job that produced adapter ``name``; 404/409 otherwise."""
    job_id = adapter_job_id(name)
    job = jobstore.get(session, job_id) if job_id is not None else None
    if job is None or (job.status == JobStatus.succeeded and job.adapter is None):  # never made, or deleted
        raise not_found("adapter", name)
    if job.status != JobStatus.succeeded or job.adapter != name:
        raise RequestError(409, "adapter_unavailable", f"adapter {name} has no model: its job is {job.status}")
    return job


def adapter_path(settings: Settings, name: str) -> Path:
    return settings.layout.adapter_dir(name)


def _public(settings: Settings, job: Job) -> AdapterPublic:
    assert job.adapter is not None and job.id is not None
    folder = adapter_path(settings, job.adapter)
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(folder.iterdir())] if folder.exists() else []
    info = read_training_info(folder)
    metrics = {**info.get("metrics", {}), "losses": info.get("losses", {}), "durations": info.get("durations", {})}
    return AdapterPublic(
        name=job.adapter,
        job_id=job.id,
        base_model=job.base_model,
        dataset=job.dataset,
        created_at=job.finished_at,
        files=files,
        metrics=metrics,
        input_fields=info.get("input_fields"),
    )


@router.get("", response_model=list[AdapterPublic])
def list_adapters(session: ReadSessionDep, settings: SettingsDep) -> list[AdapterPublic]:
    return [_public(settings, job) for job in jobstore.succeeded_jobs(session) if job.adapter]


@router.get("/{name}", response_model=AdapterPublic)
def get_adapter(name: str, session: ReadSessionDep, settings: SettingsDep) -> AdapterPublic:
    return _public(settings, adapter_job(session, name))


TARBALL = {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/{name}/download",
    response_class=StreamingResponse,
    responses={200: {"content": TARBALL, "description": "the adapter folder as a tar.gz"}},
)
def download_adapter(name: str, session: ReadSessionDep, settings: SettingsDep) -> StreamingResponse:
    adapter_job(session, name)
    folder = adapter_path(settings, name)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=f"{name}/{path.name}")
    buffer.seek(0)
    headers = {"Content-Disposition": f'attachment; filename="{name}.tar.gz"'}
    return StreamingResponse(buffer, media_type="application/gzip", headers=headers)


@router.delete("/{name}")
def delete_adapter(name: str, session: SessionDep, settings: SettingsDep, server: ModelServerDep) -> dict[str, str]:
    """Stop serving an adapter and remove its files; its job stays, succeeded, with ``adapter: null``."""
    job = adapter_job(session, name)
    assert job.id is not None
    jobstore.delete_adapter(session, job.id, name)
    session.commit()  # from here on no request resolves the name
    server.unload(name)
    shutil.rmtree(adapter_path(settings, name), ignore_errors=True)
    return {"deleted": name}
