"""Dependencies as ``Annotated`` aliases: settings, database session, model server, API key check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from service.api.errors import ApiError
from service.config import Settings
from service.db import session_scope
from service.inference import ModelServer


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.engine) as session:
        yield session


def get_model_server(request: Request) -> ModelServer:
    server: ModelServer = request.app.state.model_server
    return server


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ModelServerDep = Annotated[ModelServer, Depends(get_model_server)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With FLASHTUNE_API_KEY set, require ``Authorization: Bearer <key>`` (constant-time comparison)."""
    if not settings.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
