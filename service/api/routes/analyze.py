"""/analyze and /analyze/batch: sentiment, probabilities, importance, market reaction and analysis text for news.

The checks and the choice of a news item's fields are ``service.serving.inputs``'s (an adapter trained with
``prompt_format`` ``chat_template`` on a served base without a chat template: 409 before anything is queued), the
adapter lookup ``service.jobs.commands.resolve_served``'s (an alias, 'latest' or a name; none given:
``FLASHTUNE_DEFAULT_ADAPTER``), the analysis the serving engine's (``service.serving.engine``); the response names
the adapter and the alias it came through, and lists the given fields used (``context_used``) and left out
(``context_ignored``). ``"format": "agent"`` answers in the shape the user's local agent consumes
(``schemas.analyze.AgentAnalyzeResponse``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api import prometheus
from service.api.deps import ModelServerDep, ReadSessionDep, SettingsDep
from service.api.schemas.analyze import (
    AgentAnalyzeResponse,
    AnalyzeBatchRequest,
    AnalyzeBatchResponse,
    AnalyzeItem,
    AnalyzeRequest,
    AnalyzeResponse,
    answer,
)
from service.core.config import Settings
from service.datasets.store import dataset_input_fields
from service.jobs.commands import resolve_served
from service.llm.prompts import NewsItem
from service.serving.inputs import (
    check_batch_size,
    check_new_tokens,
    check_prompt_format,
    checked_text,
    news_input,
)
from service.serving.types import Analysis, InputContext

router = APIRouter(tags=["analyze"])


def _item_text(item: str | AnalyzeItem, settings: Settings, where: str) -> str:
    """The checked text of a request (``where`` empty) or of batch item ``where`` (``items.3``)."""
    if isinstance(item, str):
        return checked_text(item, settings=settings, field=where)
    return checked_text(item.text, settings=settings, field=f"{where}.text" if where else "text")


def _news_item(
    item: str | AnalyzeItem, settings: Settings, where: str, known: list[str] | None
) -> tuple[NewsItem, InputContext]:
    given = None if isinstance(item, str) else item.given_fields()
    return news_input(_item_text(item, settings, where), given, known)


def _observe(started: float, results: Sequence[Analysis]) -> None:
    prometheus.observe_analyze(started, [{"batch_size": r.batch_size} for r in results])


# /analyze runs on the event loop: the checks and the adapter's lookup are short, and the model call only queues the
# request and awaits it (the micro-batcher's thread serves it, ModelServer.submit_async): no worker thread of the pool
# waits through a forward pass, and no thread hop sits between the request and the model. /analyze/batch runs the model
# in the caller's thread, so it stays a plain `def` (FastAPI's thread pool): inference never blocks the event loop.
@router.post("/analyze", response_model=AnalyzeResponse | AgentAnalyzeResponse)
async def analyze(
    body: AnalyzeRequest, session: ReadSessionDep, settings: SettingsDep, server: ModelServerDep
) -> AnalyzeResponse | AgentAnalyzeResponse:
    _item_text(body, settings, "")
    check_new_tokens(body.max_new_tokens, settings=settings)
    served = resolve_served(session=session, settings=settings, name=body.adapter or settings.default_adapter)
    adapter = served.adapter
    session.close()  # release the database before the (slow) model call
    prompt_format = server.prompt_format(adapter)
    if prompt_format != "flashtune":  # may read the base's tokenizer once: off the event loop
        await run_in_threadpool(check_prompt_format, adapter, prompt_format, settings, "adapter")
    known = server.input_fields(adapter, partial(dataset_input_fields, settings))
    item, context = _news_item(body, settings, "", known)
    started = time.perf_counter()
    result = await server.submit_async(item, adapter, body.max_new_tokens, free=body.generation == "free")
    _observe(started, [result])
    return answer(result, context, served.alias, body.format)


@router.post("/analyze/batch", response_model=AnalyzeBatchResponse)
def analyze_batch(
    body: AnalyzeBatchRequest, session: ReadSessionDep, settings: SettingsDep, server: ModelServerDep
) -> AnalyzeBatchResponse:
    check_batch_size(len(body.items), settings=settings)
    for i, item in enumerate(body.items):  # every text checked before the adapter is looked up
        _item_text(item, settings, f"items.{i}")
    check_new_tokens(body.max_new_tokens, settings=settings)
    served = resolve_served(session=session, settings=settings, name=body.adapter or settings.default_adapter)
    adapter = served.adapter
    session.close()
    check_prompt_format(adapter, server.prompt_format(adapter), settings, "adapter")
    known = server.input_fields(adapter, partial(dataset_input_fields, settings))
    prepared = [_news_item(item, settings, f"items.{i}", known) for i, item in enumerate(body.items)]
    started = time.perf_counter()
    results = server.analyze([item for item, _ in prepared], adapter, body.max_new_tokens, body.generation == "free")
    _observe(started, results)
    return AnalyzeBatchResponse(
        data=[answer(r, context, served.alias, body.format) for r, (_, context) in zip(results, prepared, strict=True)]
    )
