"""/analyze: sentiment, probabilities, importance, market reaction and analysis text for a news item."""

from __future__ import annotations

import time

from fastapi import APIRouter
from sqlmodel import Session

from service import jobstore, metrics
from service.api.deps import ModelServerDep, SessionDep, SettingsDep
from service.api.errors import ApiError
from service.api.routes.adapters import adapter_job, adapter_path
from service.config import Settings
from service.inference import AdapterRef
from service.models import AnalyzeBatchRequest, AnalyzeBatchResponse, AnalyzeRequest, AnalyzeResponse

router = APIRouter(tags=["analyze"])


def resolve_adapter(session: Session, settings: Settings, name: str) -> AdapterRef | None:
    """'none' is the base alone; 'latest' the newest succeeded adapter on the served base; else a name."""
    if name == "none":
        return None
    if name == "latest":
        job = jobstore.latest_adapter(session, settings.base_model)
        if job is None or job.adapter is None:
            raise ApiError(404, "no_adapter", "no job has succeeded on this base model yet; use adapter 'none' "
                           "for the base model, or queue a job with POST /jobs")  # fmt: skip
        return AdapterRef(job.adapter, adapter_path(settings, job.adapter))
    job = adapter_job(session, name)
    if job.base_model != settings.base_model:
        raise ApiError(409, "base_model_mismatch", f"adapter {name} was trained on {job.base_model!r}; this server "
                       f"serves {settings.base_model!r}")  # fmt: skip
    return AdapterRef(name, adapter_path(settings, name))


def _check_text(text: str, settings: Settings, field: str) -> str:
    text = text.strip()
    if not text:
        raise ApiError(422, "invalid_request", f"{field} is empty", [{"field": field}])
    if len(text) > settings.max_text_chars:
        raise ApiError(422, "invalid_request", f"{field} is longer than {settings.max_text_chars} characters",
                       [{"field": field}])  # fmt: skip
    return text


def _check_tokens(max_new_tokens: int | None, settings: Settings) -> None:
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens_limit:
        raise ApiError(422, "invalid_request", f"max_new_tokens is over {settings.max_new_tokens_limit}",
                       [{"field": "max_new_tokens"}])  # fmt: skip


# Plain `def` handlers: FastAPI runs them in worker threads, so inference never blocks the event loop.
@router.post("/analyze", response_model=AnalyzeResponse)
def analyze(
    body: AnalyzeRequest, session: SessionDep, settings: SettingsDep, server: ModelServerDep
) -> AnalyzeResponse:
    text = _check_text(body.text, settings, "text")
    _check_tokens(body.max_new_tokens, settings)
    adapter = resolve_adapter(session, settings, body.adapter)
    session.close()  # release the database before the (slow) model call
    started = time.perf_counter()
    result = server.submit(text, adapter, body.max_new_tokens)
    metrics.observe_analyze(started, [result])
    return AnalyzeResponse.model_validate(result)


@router.post("/analyze/batch", response_model=AnalyzeBatchResponse)
def analyze_batch(
    body: AnalyzeBatchRequest, session: SessionDep, settings: SettingsDep, server: ModelServerDep
) -> AnalyzeBatchResponse:
    if len(body.items) > settings.max_batch_items:
        raise ApiError(422, "invalid_request", f"items holds {len(body.items)} texts; the limit is "
                       f"{settings.max_batch_items}", [{"field": "items"}])  # fmt: skip
    texts = [_check_text(t, settings, f"items.{i}") for i, t in enumerate(body.items)]
    _check_tokens(body.max_new_tokens, settings)
    adapter = resolve_adapter(session, settings, body.adapter)
    session.close()
    started = time.perf_counter()
    results = server.analyze(texts, adapter, body.max_new_tokens)
    metrics.observe_analyze(started, results)
    return AnalyzeBatchResponse(data=[AnalyzeResponse.model_validate(r) for r in results])
