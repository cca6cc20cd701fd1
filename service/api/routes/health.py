"""/healthz (process up; no model, no database), /readyz (database, serving model, whether a worker is alive while
jobs wait) and /workers (the workers the database has seen)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import ModelServerDep, ReadSessionDep, SettingsDep, require_api_key
from service.jobs import workers
from service.jobs.workers import WorkerState

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: ReadSessionDep, server: ModelServerDep, settings: SettingsDep) -> JSONResponse:
    """200 while the database answers. ``workers.notice`` says "no worker has been seen for N s" when jobs wait and
    no worker is alive: the API is ready, but nothing will train them. ``warming``: the serving model still has CUDA
    graphs of label scoring to capture between requests (after the base or an adapter loaded); requests are served
    meanwhile, those of shapes not captured yet a little slower (service/serving/engine.py)."""
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
        presence = workers.presence(session, settings.lease_seconds).model_dump()
    except Exception as exc:  # report, don't raise: this endpoint exists to say what is wrong
        database = f"error: {type(exc).__name__}"
        presence = None
    body = {
        "database": database,
        "model_loaded": server.ready,
        "warming": server.warming,
        "base_model": server.base_model,
        "workers": presence,
    }
    return JSONResponse(body, status_code=200 if database == "ok" else 503)


@router.get("/workers", response_model=list[WorkerState], dependencies=[Depends(require_api_key)])
def list_workers(session: ReadSessionDep, settings: SettingsDep) -> list[WorkerState]:
    """Every worker seen in the last week, most recently seen first: alive, stopped (exited cleanly) or lost (no
    heartbeat for a lease), and the job it runs."""
    return workers.list_workers(session, settings.lease_seconds)
