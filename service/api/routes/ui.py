"""/ui: the web dashboard, plain HTML, CSS and JavaScript files from ``service/static`` (no build step, no CDN).

The files hold no data, so they are served without the API key; the page asks for the key once, keeps it in
``sessionStorage`` and sends it as ``Authorization: Bearer`` on its API calls, which need it as always.
Every dashboard response carries a strict Content-Security-Policy: scripts, styles and connections from this
origin only, no inline script or style, no framing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, RedirectResponse

from service.api.deps import SettingsDep, require_api_key
from service.core.errors import not_found
from service.jobs import hyperparameters
from service.jobs.hyperparameters import Hyperparameters

STATIC = Path(__file__).resolve().parents[2] / "static"
MEDIA_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgrade's files are picked up at once
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = STATIC / name
    # Only plain files that are in the folder itself: the route's {name} never holds a '/', and '..' is refused.
    if name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise not_found("file", name)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
def index() -> FileResponse:
    return _file("index.html")


@router.get("/ui/static/{name}")
def static_file(name: str) -> FileResponse:
    return _file(name)


@router.get("/ui/defaults", dependencies=[Depends(require_api_key)])
def defaults(
    settings: SettingsDep, base_model: Annotated[str | None, Query(min_length=1, max_length=512)] = None
) -> dict[str, Any]:
    """The hyperparameters a job gets when it sets none, for the new-job form (service/jobs/hyperparameters.py)."""
    model = base_model or settings.base_model
    resolved = hyperparameters.defaults(model).model_dump()
    settable = {name: value for name, value in resolved.items() if name in Hyperparameters.model_fields}
    return {"base_model": model, "server_base_model": settings.base_model, "hyperparameters": settable}
