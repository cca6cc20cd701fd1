"""OpenAI-compatible serving: ``GET /v1/models`` and ``POST /v1/chat/completions`` (plain and streaming).

``model`` is an adapter name, ``latest``, or the served base model's name (the base alone). The answer is
``service.serving.chat``'s (the prompt, guided choice, JSON, text and streamed text; ``temperature`` is accepted and
ignored: decoding is greedy); this module gives it OpenAI's shapes.

``finish_reason`` is ``length`` when a plain-text answer used all of ``max_tokens``, else ``stop``; ``usage``
counts the prompt and the generated tokens, and ends a stream as a last chunk when ``stream_options`` asks for it
(``{"include_usage": true}``). Plain text streams token by token; guided choices and JSON answers are decided
whole, then sent as chunks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.deps import ModelServerDep, ReadSessionDep, SettingsDep
from service.api.schemas.analyze import ChatRequest
from service.jobs import jobstore
from service.jobs.commands import resolve_adapter
from service.serving import chat
from service.serving.chat import ChatAnswer

router = APIRouter(prefix="/v1", tags=["openai"])
STREAM_CHUNK_CHARS = 8
SSE = "text/event-stream"


@router.get("/models")
def list_models(session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    created = int(time.time())
    data = [{"id": settings.base_model, "object": "model", "created": created, "owned_by": "flashtune"}]
    for job in jobstore.succeeded_jobs(session):
        if job.adapter and job.base_model == settings.base_model:
            stamp = int(job.finished_at.timestamp()) if job.finished_at else created
            data.append({"id": job.adapter, "object": "model", "created": stamp, "owned_by": "flashtune"})
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
def chat_completions(
    body: ChatRequest, session: ReadSessionDep, settings: SettingsDep, server: ModelServerDep
) -> dict[str, Any] | StreamingResponse:
    adapter = (
        None
        if body.model == settings.base_model
        else resolve_adapter(session=session, settings=settings, name=body.model)
    )
    session.close()
    prompt = chat.chat_prompt(body.conversation(), max_chars=settings.max_text_chars)
    max_tokens = chat.token_budget(body.max_completion_tokens or body.max_tokens, settings.max_new_tokens_limit)
    mode = chat.answer_mode(body.guided_choice, body.response_format)
    reply = Reply(
        f"chatcmpl-{uuid.uuid4().hex[:24]}", body.model, bool((body.stream_options or {}).get("include_usage"))
    )
    if mode == "text" and body.stream:
        return StreamingResponse(_token_events(reply, chat.stream(server, adapter, prompt, max_tokens)), media_type=SSE)
    answer = chat.answer(server, adapter, prompt, mode=mode, max_tokens=max_tokens, choices=body.guided_choice)
    if body.stream:
        return StreamingResponse(_whole_events(reply, answer), media_type=SSE)
    return reply.completion(answer)


@dataclass(frozen=True)
class Reply:
    """What every chunk of one completion repeats, and whether its stream ends with the token counts."""

    id: str
    model: str
    include_usage: bool

    def completion(self, answer: ChatAnswer) -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.content}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason}],
            "usage": self.usage(answer),
        }

    @staticmethod
    def usage(answer: ChatAnswer) -> dict[str, int]:
        return {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish}])

    def end(self, answer: ChatAnswer) -> Iterator[str]:
        """The last chunks: the finish reason, the usage if asked for, and [DONE]."""
        yield self.chunk({}, answer.finish_reason)
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


async def _token_events(reply: Reply, pieces: AsyncGenerator[str | ChatAnswer, None]) -> AsyncIterator[str]:
    """Server-sent chunks, one per piece of text as it is generated; the stream of pieces is closed when this one
    ends, which stops the generation if the client went away."""
    async with aclosing(pieces):
        yield reply.chunk({"role": "assistant", "content": ""})
        try:
            async for piece in pieces:
                if isinstance(piece, str):
                    yield reply.chunk({"content": piece})
                else:
                    for message in reply.end(piece):
                        yield message
        except Exception as exc:  # noqa: BLE001 - logged where it happened; the client gets the stream's last message
            error = {"type": "internal_error", "message": f"generation failed: {type(exc).__name__}"}
            yield f"data: {json.dumps({'error': error})}\n\n"


def _whole_events(reply: Reply, answer: ChatAnswer) -> Iterator[str]:
    """A whole answer (a guided choice, a JSON document) sent as a stream."""
    yield reply.chunk({"role": "assistant", "content": ""})
    for i in range(0, len(answer.content), STREAM_CHUNK_CHARS):
        yield reply.chunk({"content": answer.content[i : i + STREAM_CHUNK_CHARS]})
    yield from reply.end(answer)
