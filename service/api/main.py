"""The FastAPI application: one router per resource, shared state on ``app.state``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service.api import errors, openapi, security
from service.api.deps import require_api_key
from service.api.routes import (
    adapters,
    aliases,
    analyze,
    datasets,
    health,
    jobs,
    metrics,
    openai_compat,
    openai_finetune,
    ui,
)
from service.core import scratch
from service.core.config import Settings, get_settings
from service.jobs.db import init_db, make_engine
from service.serving.engine import ModelServer

log = logging.getLogger("flashtune.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        for path in scratch.remove_stale("import"):  # private copies of SQLite uploads whose server was killed
            log.warning("removed %s, left by an import that did not finish", path)
        app.state.settings = settings
        app.state.engine = make_engine(settings.resolved_database_url)
        init_db(app.state.engine)
        app.state.model_server = ModelServer(settings)
        yield
        app.state.engine.dispose()

    description = "Fine-tune LLMs on financial flash news with (Q)LoRA and serve the adapters."
    # redirect_slashes=False: Starlette's redirect from /jobs/ to /jobs is an absolute URL built from the request's
    # Host header, i.e. a redirect to whatever host the client names; without it /jobs/ is a plain 404.
    app = FastAPI(
        title="FlashTune", version="0.1.0", description=description, lifespan=lifespan, redirect_slashes=False
    )
    errors.install(app)
    security.install(app, settings)  # request ids, body limits, rate limit (service/api/security.py)
    openapi.install(app, settings)  # the setting limits and the links in /openapi.json (service/api/openapi.py)
    app.include_router(health.router)
    protected = [Depends(require_api_key)]
    documented = security.error_responses(400, 401, 404, 409, 413, 422, 429, 503)
    for router in (
        jobs.router,
        datasets.router,
        adapters.router,
        aliases.router,
        analyze.router,
        openai_compat.router,
        openai_finetune.router,
    ):
        app.include_router(router, dependencies=protected, responses=documented)
    app.include_router(metrics.router, dependencies=protected, responses=documented)  # Prometheus can send the key
    if settings.dashboard:  # the files are public, the API calls they make need the key (routes/ui.py)
        app.include_router(ui.router)
    return app
