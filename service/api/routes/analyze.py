"""/analyze: sentiment, probabilities, importance, market reaction and analysis text for a news item.

A news item may carry ``metadata`` (star, country, calendar figures) and ``market_context`` (pre_ret, volatility,
trend). They go into the model input through :func:`service.llm.prompts.render_input`, the function the dataset
importers build training inputs with, but only the fields the adapter's training inputs carried: a field it never
saw would only be noise to it. The response lists what was used (``context_used``) and what was left out
(``context_ignored``). The base alone (``adapter: "none"``) takes every field.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from sqlmodel import Session

from service.api import prometheus
from service.api.deps import ModelServerDep, ReadSessionDep, SettingsDep
from service.api.routes.adapters import adapter_job, adapter_path
from service.core.config import Settings
from service.core.errors import RequestError
from service.core.layout import AdapterRef
from service.jobs import jobstore
from service.jobs.models import AnalyzeBatchRequest, AnalyzeBatchResponse, AnalyzeItem, AnalyzeRequest, AnalyzeResponse
from service.llm.prompts import INPUT_FIELDS, NewsItem

router = APIRouter(tags=["analyze"])


def resolve_adapter(session: Session, settings: Settings, name: str) -> AdapterRef | None:
    """'none' is the base alone; 'latest' the newest succeeded adapter on the served base; else a name."""
    if name == "none":
        return None
    if name == "latest":
        job = jobstore.latest_adapter(session, settings.base_model)
        if job is None or job.adapter is None:
            raise RequestError(
                404,
                "no_adapter",
                "no job has succeeded on this base model yet; use adapter 'none' "
                "for the base model, or queue a job with POST /jobs",
            )
        return AdapterRef(job.adapter, adapter_path(settings, job.adapter))
    job = adapter_job(session, name)
    if job.base_model != settings.base_model:
        raise RequestError(
            409,
            "base_model_mismatch",
            f"adapter {name} was trained on {job.base_model!r}; this server serves {settings.base_model!r}",
        )
    return AdapterRef(name, adapter_path(settings, name))


def _check_text(text: str, settings: Settings, field: str) -> str:
    text = text.strip()
    if not text:
        raise RequestError(422, "invalid_request", f"{field} is empty", [{"field": field}])
    if len(text) > settings.max_text_chars:
        raise RequestError(
            422, "invalid_request", f"{field} is longer than {settings.max_text_chars} characters", [{"field": field}]
        )
    return text


def _check_tokens(max_new_tokens: int | None, settings: Settings) -> None:
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens_limit:
        raise RequestError(
            422,
            "invalid_request",
            f"max_new_tokens is over {settings.max_new_tokens_limit}",
            [{"field": "max_new_tokens"}],
        )


def _item_text(item: str | AnalyzeItem, settings: Settings, where: str) -> str:
    """The checked text of a request (``where`` empty) or of batch item ``where`` (``items.3``)."""
    if isinstance(item, str):
        return _check_text(item, settings, where)
    return _check_text(item.text, settings, f"{where}.text" if where else "text")


def news_item(
    item: str | AnalyzeItem, settings: Settings, where: str, known: list[str] | None
) -> tuple[NewsItem, dict[str, list[str]]]:
    """The checked item with the given fields the adapter knows (``known``; None: all), and which were left out."""
    text = _item_text(item, settings, where)
    if isinstance(item, str):
        return NewsItem(text), {"context_used": [], "context_ignored": []}
    given: dict[str, Any] = {}
    for part in (item.metadata, item.market_context):
        if part is not None:
            given.update({k: v for k, v in part.model_dump().items() if v is not None})
    used = [f for f in INPUT_FIELDS if f in given and (known is None or f in known)]
    ignored = [f for f in INPUT_FIELDS if f in given and f not in used]
    return NewsItem(text, {f: given[f] for f in used}), {"context_used": used, "context_ignored": ignored}


# Plain `def` handlers: FastAPI runs them in worker threads, so inference never blocks the event loop.
@router.post("/analyze", response_model=AnalyzeResponse)
def analyze(
    body: AnalyzeRequest, session: ReadSessionDep, settings: SettingsDep, server: ModelServerDep
) -> AnalyzeResponse:
    _item_text(body, settings, "")
    _check_tokens(body.max_new_tokens, settings)
    adapter = resolve_adapter(session, settings, body.adapter)
    session.close()  # release the database before the (slow) model call
    item, context = news_item(body, settings, "", server.input_fields(adapter))
    started = time.perf_counter()
    result = server.submit(item, adapter, body.max_new_tokens)
    prometheus.observe_analyze(started, [result])
    return AnalyzeResponse.model_validate({**result, **context})


@router.post("/analyze/batch", response_model=AnalyzeBatchResponse)
def analyze_batch(
    body: AnalyzeBatchRequest, session: ReadSessionDep, settings: SettingsDep, server: ModelServerDep
) -> AnalyzeBatchResponse:
    if len(body.items) > settings.max_batch_items:
        raise RequestError(
            422,
            "invalid_request",
            f"items holds {len(body.items)} texts; the limit is {settings.max_batch_items}",
            [{"field": "items"}],
        )
    for i, item in enumerate(body.items):  # every text checked before the adapter is looked up
        _item_text(item, settings, f"items.{i}")
    _check_tokens(body.max_new_tokens, settings)
    adapter = resolve_adapter(session, settings, body.adapter)
    session.close()
    known = server.input_fields(adapter)
    prepared = [news_item(item, settings, f"items.{i}", known) for i, item in enumerate(body.items)]
    started = time.perf_counter()
    results = server.analyze([item for item, _ in prepared], adapter, body.max_new_tokens)
    prometheus.observe_analyze(started, results)
    return AnalyzeBatchResponse(
        data=[AnalyzeResponse.model_validate({**r, **c}) for r, (_, c) in zip(results, prepared, strict=True)]
    )
