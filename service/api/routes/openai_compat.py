"""OpenAI-compatible serving: ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST /v1/chat/completions`` (plain and
streaming).

``model`` is an adapter name (a fine-tuned model's id, ``job-3`` or ``job-3:<suffix>``), an alias (``production``,
``latest``), or the served base model's name (the base alone). Which parameters are honoured and which refused is
``service.api.schemas.chat``'s; the answer is ``service.serving.chat``'s; this module gives it OpenAI's shapes.

The prompt is checked and fitted (``chat.fit``) before any answer starts, so a prompt over the limits is a 422 even
for a stream. ``finish_reason`` is ``length`` when a text answer used all of ``max_tokens``, else ``stop``; ``usage``
counts the prompt and the generated tokens, and ends a stream as a last chunk when ``stream_options`` asks for it
(``{"include_usage": true}``). Text streams token by token, each chunk with the logprobs of the tokens it completes
when asked; ``n`` answers stream one after the other, each chunk naming its ``index``. Guided choices and JSON
answers are decided whole, then sent as chunks. A client that goes away stops the generation at its next token:
a stream when its response is closed, a plain request when the disconnect watch below sees it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import ModelServerDep, ReadSessionDep, SettingsDep
from service.api.schemas.chat import ChatRequest
from service.api.schemas.fine_tuning import model_id, split_model_id
from service.core.config import Settings
from service.core.errors import RequestError, not_found
from service.core.layout import AdapterRef
from service.jobs import commands, jobstore
from service.llm.sampling import TokenLogprob
from service.serving import chat
from service.serving.chat import ChatAnswer, Fitted, Options, Piece
from service.serving.engine import ModelServer

router = APIRouter(prefix="/v1", tags=["openai"])
STREAM_CHUNK_CHARS = 8
SSE = "text/event-stream"
DISCONNECT_POLL_SECONDS = 0.25
T = TypeVar("T")


def _model(ident: str, created: int) -> dict[str, Any]:
    return {"id": ident, "object": "model", "created": created, "owned_by": "flashtune"}


@router.get("/models")
def list_models(session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    created = int(time.time())
    data = [_model(settings.base_model, created)]
    for job in jobstore.succeeded_jobs(session):
        ident = model_id(job)
        if ident and job.base_model == settings.base_model:
            data.append(_model(ident, int(job.finished_at.timestamp()) if job.finished_at else created))
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def get_model(model: str, session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    """The base, a fine-tuned model (``job-3``, ``job-3:<suffix>``) or an alias; 404 for anything else."""
    if model == settings.base_model:
        return _model(model, int(time.time()))
    _served(session, settings, model)  # 404 / 409 as chat completions would answer
    name, _ = split_model_id(model)
    job = commands.adapter_job(session=session, name=name) if name.startswith("job-") else None
    stamp = job.finished_at if job is not None and job.finished_at else None
    return _model(model, int(stamp.timestamp()) if stamp else int(time.time()))


def _served(session: Session, settings: Settings, model: str) -> AdapterRef | None:
    """The adapter ``model`` names (None: the base alone); a 404 names the ``model`` field."""
    if model == settings.base_model:
        return None
    name, suffix = split_model_id(model)
    try:
        adapter = commands.resolve_adapter(session=session, settings=settings, name=name)
        if suffix is not None:  # job-3:<suffix> names job 3 only if the job was given that suffix
            job = commands.adapter_job(session=session, name=name)
            if job.name != suffix:
                raise not_found("model", model[:128])
    except RequestError as exc:
        if exc.status == 404:
            raise RequestError(404, exc.type, exc.message, [{"field": "model"}]) from exc
        raise
    return adapter


@dataclass(frozen=True)
class Plan:
    adapter: AdapterRef | None
    fitted: Fitted
    options: Options


def _plan(body: ChatRequest, session: Session, settings: Settings, server: ModelServer) -> Plan:
    """Everything checked before an answer starts: the parameters, the model, the prompt's characters and tokens."""
    options = body.options(settings)
    adapter = _served(session, settings, body.model)
    session.close()
    conversation = body.conversation()
    prompt = chat.chat_prompt(conversation, max_chars=settings.max_text_chars, max_total_chars=settings.max_chat_chars)
    used = sum(len(text) for _, text in conversation)
    chat.check_choices(list(options.choices), room_chars=settings.max_chat_chars - used)
    return Plan(adapter, chat.fit(server, adapter, prompt, options, settings.max_chat_prompt_tokens), options)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, request: Request, session: ReadSessionDep, settings: SettingsDep, server: ModelServerDep
) -> dict[str, Any] | StreamingResponse:
    plan = await run_in_threadpool(_plan, body, session, settings, server)
    reply = Reply(
        f"chatcmpl-{uuid.uuid4().hex[:24]}", body.model, bool((body.stream_options or {}).get("include_usage"))
    )
    if plan.options.mode == "text" and body.stream:
        pieces = chat.stream(server, plan.adapter, plan.fitted, plan.options)
        return StreamingResponse(_token_events(reply, pieces), media_type=SSE)
    stop = threading.Event()
    answer = await _watching(request, stop, lambda: chat.answer(server, plan.adapter, plan.fitted, plan.options, stop))
    if body.stream:
        return StreamingResponse(_whole_events(reply, answer), media_type=SSE)
    return reply.completion(answer)


async def _watching(request: Request, stop: threading.Event, work: Callable[[], T]) -> T:
    """``work()`` in a worker thread; if the client disconnects meanwhile, ``stop`` is set (a generation then ends
    at its next token) and the result, which nobody will read, is still awaited."""
    task = asyncio.ensure_future(run_in_threadpool(work))
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if not done and not stop.is_set() and await request.is_disconnected():
            stop.set()
    return task.result()


# --------------------------------------------------------------------------------------------------- shapes
def logprobs_object(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if tokens is None:
        return None
    content = [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": t.bytes,
            "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": a.bytes} for a in t.top],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


@dataclass(frozen=True)
class Reply:
    """What every chunk of one completion repeats, and whether its stream ends with the token counts."""

    id: str
    model: str
    include_usage: bool

    def completion(self, answer: ChatAnswer) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.content, "refusal": None},
                "logprobs": logprobs_object(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(answer.choices)
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": self.usage(answer),
        }

    @staticmethod
    def usage(answer: ChatAnswer) -> dict[str, int]:
        return {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return self._event([choice])

    def start(self, index: int) -> str:
        return self.chunk(index, {"role": "assistant", "content": ""})

    def end(self, answer: ChatAnswer) -> Iterator[str]:
        """The last chunks: each choice's finish reason, the usage if asked for, and [DONE]."""
        for i, choice in enumerate(answer.choices):
            yield self.chunk(i, {}, choice.finish_reason)
        if self.include_usage:  # as OpenAI sends it: no choices, only the counts
            yield self._event([], self.usage(answer))
        yield "data: [DONE]\n\n"

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            **({"usage": usage} if usage is not None else {}),
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _token_events(reply: Reply, pieces: AsyncGenerator[Piece | ChatAnswer, None]) -> AsyncIterator[str]:
    """Server-sent chunks, one per piece of text as it is generated; the stream of pieces is closed when this one
    ends, which stops the generation if the client went away."""
    async with aclosing(pieces):
        started: set[int] = set()
        try:
            async for piece in pieces:
                if isinstance(piece, ChatAnswer):
                    for i in sorted(set(range(len(piece.choices))) - started):  # answers that were empty
                        yield reply.start(i)
                    for message in reply.end(piece):
                        yield message
                    continue
                if piece.index not in started:
                    started.add(piece.index)
                    yield reply.start(piece.index)
                logprobs = logprobs_object(piece.logprobs) if piece.logprobs else None
                yield reply.chunk(piece.index, {"content": piece.text}, logprobs=logprobs)
        except Exception as exc:  # noqa: BLE001 - logged where it happened; the client gets the stream's last message
            error = {"type": "internal_error", "message": f"generation failed: {type(exc).__name__}"}
            yield f"data: {json.dumps({'error': error})}\n\n"


def _whole_events(reply: Reply, answer: ChatAnswer) -> Iterator[str]:
    """A whole answer (a guided choice, a JSON document) sent as a stream."""
    for i, choice in enumerate(answer.choices):
        yield reply.start(i)
        for at in range(0, len(choice.content), STREAM_CHUNK_CHARS):
            yield reply.chunk(i, {"content": choice.content[at : at + STREAM_CHUNK_CHARS]})
    yield from reply.end(answer)
