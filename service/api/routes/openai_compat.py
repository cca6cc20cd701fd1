"""OpenAI-compatible serving: ``GET /v1/models`` and ``POST /v1/chat/completions`` (plain and streaming).

``model`` is an adapter name, ``latest``, or the served base model's name (the base alone). The system message,
if any, becomes the instruction and the last user message the input of the training prompt format, so an
adapter sees what it was trained on. Decoding is greedy (``temperature`` is accepted and ignored).

Constrained output: ``guided_choice`` (a list of strings) returns the choice the model scores highest;
``response_format`` ``json_object`` / ``json_schema`` returns the /analyze result as a JSON document.

``finish_reason`` is ``length`` when a plain-text answer used all of ``max_tokens``, else ``stop``; ``usage``
counts the prompt and the generated tokens, and ends a stream as a last chunk when ``stream_options`` asks for it
(``{"include_usage": true}``).

Streaming (``stream: true``) of plain text is token by token: the generation runs in a thread of its own and
hands each new piece of text, as its token is generated, through a thread-safe hand-off into an asyncio queue
that the response reads, so the event loop never waits on the model. A client that goes away stops the
generation at its next token. Guided choices and JSON answers are decided whole, then sent as chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import ModelServerDep, ReadSessionDep, SettingsDep
from service.api.routes.analyze import resolve_adapter
from service.core.errors import RequestError
from service.core.layout import AdapterRef
from service.jobs import jobstore
from service.llm.prompts import DEFAULT_INSTRUCTION, render_prompt
from service.llm.scoring import build_prompts, continuation_logprobs, generate_stream
from service.serving.engine import ModelServer

log = logging.getLogger("flashtune.api")
router = APIRouter(prefix="/v1", tags=["openai"])
DEFAULT_MAX_TOKENS = 128
STREAM_CHUNK_CHARS = 8


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send many optional fields; unknown ones change nothing
    model: str = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1, max_length=64)


@router.get("/models")
def list_models(session: ReadSessionDep, settings: SettingsDep) -> dict[str, Any]:
    created = int(time.time())
    data = [{"id": settings.base_model, "object": "model", "created": created, "owned_by": "flashtune"}]
    for job in jobstore.succeeded_jobs(session):
        if job.adapter and job.base_model == settings.base_model:
            stamp = int(job.finished_at.timestamp()) if job.finished_at else created
            data.append({"id": job.adapter, "object": "model", "created": stamp, "owned_by": "flashtune"})
    return {"object": "list", "data": data}


def _prompt(body: ChatRequest, max_chars: int) -> tuple[str, str]:
    """(user text, instruction) for the training prompt format."""
    system = "\n".join(m.text for m in body.messages if m.role in ("system", "developer")).strip()
    users = [m.text for m in body.messages if m.role == "user"]
    if not users or not users[-1].strip():
        raise RequestError(422, "invalid_request", "messages needs a non-empty user message", [{"field": "messages"}])
    if len(users[-1]) > max_chars:
        raise RequestError(
            422, "invalid_request", f"the user message is over {max_chars} characters", [{"field": "messages"}]
        )
    return users[-1], system or DEFAULT_INSTRUCTION


@router.post("/chat/completions", response_model=None)
def chat_completions(
    body: ChatRequest, session: ReadSessionDep, settings: SettingsDep, server: ModelServerDep
) -> dict[str, Any] | StreamingResponse:
    adapter = None if body.model == settings.base_model else resolve_adapter(session, settings, body.model)
    session.close()
    user_text, instruction = _prompt(body, settings.max_text_chars)

    def prompt_for(model: Any, tokenizer: Any) -> str:
        return build_prompts(model, tokenizer, [user_text], [instruction])[0]

    max_tokens = min(body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS, settings.max_new_tokens_limit)
    prompt_tokens = server.count_tokens(render_prompt(user_text, instruction))
    reply = Reply(
        f"chatcmpl-{uuid.uuid4().hex[:24]}",
        body.model,
        prompt_tokens,
        bool((body.stream_options or {}).get("include_usage")),
    )
    format_type = (body.response_format or {}).get("type", "text")
    finish = "stop"
    if body.guided_choice:
        choices = body.guided_choice

        def choose(model: Any, tokenizer: Any) -> str:
            scores = continuation_logprobs(model, tokenizer, [prompt_for(model, tokenizer)], [choices])[0]
            return choices[max(range(len(choices)), key=scores.__getitem__)]

        content = server.run(adapter, choose)
        completion_tokens = server.count_tokens(content)
    elif format_type in ("json_object", "json_schema"):
        result = server.submit(user_text.strip(), adapter, max_tokens)
        content = json.dumps(
            {
                k: result[k]
                for k in ("label", "label_id", "score", "probs", "importance", "market_reaction", "analysis")
            },
            ensure_ascii=False,
        )
        completion_tokens = server.count_tokens(content)
    elif format_type == "text" and body.stream:
        return StreamingResponse(
            _token_stream(server, adapter, prompt_for, max_tokens, reply), media_type="text/event-stream"
        )
    elif format_type == "text":

        def complete(model: Any, tokenizer: Any) -> tuple[str, int]:
            pieces: list[str] = []  # the streamed pieces join up to the whole answer (scoring.generate_stream)
            count = generate_stream(model, tokenizer, prompt_for(model, tokenizer), max_tokens, pieces.append)
            return "".join(pieces), count

        content, completion_tokens = server.run(adapter, complete)
        finish = _finish_reason(completion_tokens, max_tokens)
    else:
        raise RequestError(
            422,
            "invalid_request",
            f"response_format type {format_type!r} is not supported",
            [{"field": "response_format.type"}],
        )
    if body.stream:
        return StreamingResponse(_stream(reply, content, completion_tokens), media_type="text/event-stream")
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": reply.usage(completion_tokens),
    }


def _finish_reason(generated: int, max_tokens: int) -> str:
    return "length" if generated >= max_tokens else "stop"


@dataclass(frozen=True)
class Reply:
    """What every chunk of one completion repeats, and whether its stream ends with the token counts."""

    id: str
    model: str
    prompt_tokens: int
    include_usage: bool

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish}])

    def end(self, finish: str, completion_tokens: int) -> Iterator[str]:
        """The last chunks: the finish reason, the usage if asked for, and [DONE]."""
        yield self.chunk({}, finish)
        if self.include_usage:  # as OpenAI sends it: no choices, only the counts
            yield self._event([], self.usage(completion_tokens))
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


_END = object()


async def _token_stream(
    server: ModelServer,
    adapter: AdapterRef | None,
    prompt_for: Callable[[Any, Any], str],
    max_tokens: int,
    reply: Reply,
) -> AsyncIterator[str]:
    """Server-sent chunks, one per piece of text as the generating thread produces it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def hand_over(item: Any) -> None:  # called on the generating thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def run(model: Any, tokenizer: Any) -> int:
        return generate_stream(model, tokenizer, prompt_for(model, tokenizer), max_tokens, hand_over, stop)

    def work() -> None:
        try:
            hand_over((_END, server.run(adapter, run)))
        except Exception as exc:  # noqa: BLE001 - reported to the client as the stream's last message
            log.exception("streamed generation failed")
            hand_over((_END, exc))

    threading.Thread(target=work, name="flashtune-stream", daemon=True).start()
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            item = await queue.get()
            if isinstance(item, str):
                yield reply.chunk({"content": item})
                continue
            _, outcome = item
            if isinstance(outcome, Exception):
                error = {"type": "internal_error", "message": f"generation failed: {type(outcome).__name__}"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            for message in reply.end(_finish_reason(outcome, max_tokens), outcome):
                yield message
            return
    finally:
        stop.set()  # the client went away (or the stream ended): the generation stops at its next token


def _stream(reply: Reply, content: str, completion_tokens: int) -> Iterator[str]:
    """A whole answer (a guided choice, a JSON document) sent as a stream."""
    yield reply.chunk({"role": "assistant", "content": ""})
    for i in range(0, len(content), STREAM_CHUNK_CHARS):
        yield reply.chunk({"content": content[i : i + STREAM_CHUNK_CHARS]})
    yield from reply.end("stop", completion_tokens)
