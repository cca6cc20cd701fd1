"""One error shape for every response: ``{"error": {"type", "message", "details"?}}``."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.core.capping import cap_message, capped
from service.core.errors import RequestError
from service.datasets.base import DatasetError

log = logging.getLogger("flashtune.api")


def _body(type: str, message: str, details: Any = None) -> dict[str, Any]:
    """Every error body, with what it echoes capped (service/core/capping.py): bounded whatever the request held."""
    error: dict[str, Any] = {"type": type, "message": cap_message(message)}
    if details is not None:
        error["details"] = capped(details)
    return {"error": error}


METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on the request's path (for ``Allow`` on a 405): each is tried against the
    router as routing itself would match it."""
    routes = request.app.router.routes
    allowed = []
    for method in METHOD_ORDER:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in routes):
            allowed.append(method)
    return allowed


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _api_error(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(_body(exc.type, exc.message, exc.details), status_code=exc.status)

    @app.exception_handler(DatasetError)
    async def _dataset_error(_request: Request, exc: DatasetError) -> JSONResponse:
        """An upload that cannot become a dataset (service/datasets): the details name the line, field or column."""
        return JSONResponse(_body("invalid_dataset", str(exc), exc.details), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        fields = ", ".join(d["field"] or "body" for d in details)
        return JSONResponse(_body("invalid_request", f"invalid request: {fields}", details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names the methods of one route; a path may have several
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return JSONResponse(_body(kind, str(exc.detail)), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex[:12]  # set by security.py
        log.exception("unhandled error (request %s)", request_id)
        return JSONResponse(
            _body("internal_error", f"internal server error (request id {request_id})"),
            status_code=500,
            headers={"X-Request-ID": request_id},
        )
