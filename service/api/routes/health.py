"""/healthz (process up; no model, no database) and /readyz (database and serving model)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import ModelServerDep, ReadSessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: ReadSessionDep, server: ModelServerDep) -> JSONResponse:
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # report, don't raise: this endpoint exists to say what is wrong
        database = f"error: {type(exc).__name__}"
    body = {"database": database, "model_loaded": server.ready, "base_model": server.base_model}
    return JSONResponse(body, status_code=200 if database == "ok" else 503)
