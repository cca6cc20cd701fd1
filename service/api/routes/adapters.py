"""/adapters: the adapters of succeeded jobs, their files and metrics, and a download of each."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.deps import ModelServerDep, ReadSessionDep, SessionDep, SettingsDep
from service.api.schemas.jobs import AdapterPublic
from service.core.config import Settings
from service.jobs import commands, jobstore
from service.jobs.models import Job

router = APIRouter(prefix="/adapters", tags=["adapters"])
TARBALL = {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}


def _public(settings: Settings, job: Job) -> AdapterPublic:
    assert job.adapter is not None
    files, info = commands.adapter_contents(settings=settings, name=job.adapter)
    return AdapterPublic.of(job, files, info)


@router.get("", response_model=list[AdapterPublic])
def list_adapters(session: ReadSessionDep, settings: SettingsDep) -> list[AdapterPublic]:
    return [_public(settings, job) for job in jobstore.succeeded_jobs(session) if job.adapter]


@router.get("/{name}", response_model=AdapterPublic)
def get_adapter(name: str, session: ReadSessionDep, settings: SettingsDep) -> AdapterPublic:
    return _public(settings, commands.adapter_job(session=session, name=name))


@router.get(
    "/{name}/download",
    response_class=StreamingResponse,
    responses={200: {"content": TARBALL, "description": "the adapter folder as a tar.gz"}},
)
def download_adapter(name: str, session: ReadSessionDep, settings: SettingsDep) -> StreamingResponse:
    archive = commands.pack_adapter(session=session, settings=settings, name=name)
    headers = {"Content-Disposition": f'attachment; filename="{name}.tar.gz"'}
    return StreamingResponse(archive, media_type="application/gzip", headers=headers)


@router.delete("/{name}")
def delete_adapter(name: str, session: SessionDep, settings: SettingsDep, server: ModelServerDep) -> dict[str, str]:
    """Stop serving an adapter and remove its files; its job stays, succeeded, with ``adapter: null``."""
    commands.delete_adapter(session=session, settings=settings, name=name, unload=server.unload)
    return {"deleted": name}
