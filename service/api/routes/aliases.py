"""/aliases: names the clients call adapters by (``production``), set by hand or moved by a job's promotion.

The rules are ``service.jobs.aliases``'s; ``POST /adapters/{name}/aliases`` (routes/adapters.py) sets one from the
adapter's side.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import ReadSessionDep, SessionDep, SettingsDep
from service.api.schemas.aliases import ALIAS_NAME, AliasPublic, AliasSet
from service.core.errors import not_found
from service.jobs import aliases, commands

router = APIRouter(prefix="/aliases", tags=["aliases"])


@router.get("", response_model=list[AliasPublic])
def list_aliases(session: ReadSessionDep) -> list[AliasPublic]:
    return [AliasPublic.of(row) for row in aliases.list_all(session)]


@router.get("/{alias}", response_model=AliasPublic)
def get_alias(alias: str, session: ReadSessionDep) -> AliasPublic:
    row = aliases.get(session, alias)
    if row is None:
        raise not_found("alias", alias[:64])
    return AliasPublic.of(row)


@router.put("/{alias}", response_model=AliasPublic)
def set_alias(
    alias: Annotated[str, Path(json_schema_extra=ALIAS_NAME)],
    body: AliasSet,
    session: SessionDep,
    settings: SettingsDep,
) -> AliasPublic:
    """Point the alias at an adapter (creating it); from the next request on, it serves that adapter."""
    name = aliases.checked_name(alias)
    job = commands.adapter_job(session=session, name=body.adapter)
    row = aliases.point(session, settings, alias=name, job=job, reason=body.reason or "set by request")
    return AliasPublic.of(row)


@router.delete("/{alias}")
def delete_alias(alias: str, session: SessionDep) -> dict[str, str]:
    """Drop the alias; its adapter stays (requests naming the alias get 404 from now on)."""
    if aliases.remove(session, alias) is None:
        raise not_found("alias", alias[:64])
    return {"deleted": alias}
