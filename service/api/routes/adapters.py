"""/adapters: the adapters of succeeded jobs, their files, metrics, aliases and promotion, and a download of each;
``POST /adapters/{name}/aliases`` points an alias at one (promotes it by hand)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlmodel import Session

from service.api.deps import ModelServerDep, ReadSessionDep, SessionDep, SettingsDep
from service.api.schemas.aliases import AdapterAliasSet, AliasPublic, PromotionPublic
from service.api.schemas.jobs import AdapterPublic
from service.core.config import Settings
from service.jobs import aliases, commands, jobstore
from service.jobs.models import Job

router = APIRouter(prefix="/adapters", tags=["adapters"])
TARBALL = {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}


def _public(session: Session, settings: Settings, job: Job) -> AdapterPublic:
    assert job.adapter is not None and job.id is not None
    files, info = commands.adapter_contents(settings=settings, name=job.adapter)
    promotion = aliases.promotion(session, job.id)
    extra = {
        "aliases": aliases.names_for(session, job.adapter),
        "promotion": PromotionPublic.of(promotion) if promotion is not None else None,
    }
    return AdapterPublic.of(job, files, info).model_copy(update=extra)


@router.get("", response_model=list[AdapterPublic])
def list_adapters(session: ReadSessionDep, settings: SettingsDep) -> list[AdapterPublic]:
    return [_public(session, settings, job) for job in jobstore.succeeded_jobs(session) if job.adapter]


@router.get("/{name}", response_model=AdapterPublic)
def get_adapter(name: str, session: ReadSessionDep, settings: SettingsDep) -> AdapterPublic:
    return _public(session, settings, commands.adapter_job(session=session, name=name))


@router.post("/{name}/aliases", response_model=AliasPublic)
def alias_adapter(name: str, body: AdapterAliasSet, session: SessionDep, settings: SettingsDep) -> AliasPublic:
    """Point an alias (``production``) at this adapter: a promotion by hand, with no evaluation gate."""
    alias = aliases.checked_name(body.alias)
    job = commands.adapter_job(session=session, name=name)
    return AliasPublic.of(
        aliases.point(session, settings, alias=alias, job=job, reason=body.reason or "promoted by request")
    )


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
