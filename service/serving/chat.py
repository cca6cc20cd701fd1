"""Chat completions on the served model (``POST /v1/chat/completions``): one prompt, four ways to answer it.

A conversation maps onto the training prompt format (:func:`chat_prompt`): the system (and developer) messages
become the instruction and the last user message the input, so an adapter sees what it was trained on. Every
answer shows the model the same prompt, :meth:`ChatPrompt.render` (the input clipped to the model's context, as
/analyze clips it), and counts ``prompt_tokens`` on that rendered prompt:

- :func:`choose` (``guided_choice``): the choice the model scores highest;
- :func:`answer_json` (``response_format`` ``json_object`` / ``json_schema``): the /analyze result of the prompt's
  input and instruction, as a JSON document;
- :func:`complete` (plain text): greedy generation; finish reason ``length`` when it used all of ``max_tokens``;
- :func:`stream` (plain text, ``stream: true``): the same generation token by token. It runs in a thread of its
  own and hands each new piece of text, as its token is generated, through a thread-safe hand-off into an asyncio
  queue that the response reads, so the event loop never waits on the model. Closing the stream (the client went
  away) stops the generation at its next token.

Decoding is greedy. Everything runs on the engine's model through :meth:`ModelServer.with_model` (or its micro-batched
:meth:`ModelServer.submit` for JSON), so it holds the model lock like /analyze does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from service.core.errors import RequestError
from service.core.layout import AdapterRef
from service.llm.prompts import DEFAULT_INSTRUCTION
from service.llm.scoring import build_prompts, continuation_logprobs, generate_stream
from service.serving.engine import ModelServer

log = logging.getLogger("flashtune.inference")
DEFAULT_MAX_TOKENS = 128
JSON_FORMATS = ("json_object", "json_schema")
Mode = Literal["choice", "json", "text"]


@dataclass(frozen=True)
class ChatPrompt:
    """The training prompt a conversation maps to: its input (the last user message) and its instruction."""

    text: str
    instruction: str

    def render(self, model: Any, tokenizer: Any) -> str:
        """The prompt the model sees: the training format, the input clipped so that prompt and response fit the
        model's context (``service.llm.scoring.build_prompts``, the builder of every serving path)."""
        return build_prompts(model, tokenizer, [self.text], [self.instruction])[0]


@dataclass(frozen=True)
class ChatAnswer:
    content: str
    prompt_tokens: int  # of the rendered (clipped) prompt
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


def chat_prompt(messages: Iterable[tuple[str, str]], *, max_chars: int) -> ChatPrompt:
    """The prompt of a conversation given as ``(role, text)`` pairs: the system and developer messages joined are
    the instruction (none: the default one), the last user message the input; refused (422) without a non-empty
    user message or with one over ``max_chars``."""
    messages = list(messages)
    system = "\n".join(text for role, text in messages if role in ("system", "developer")).strip()
    users = [text for role, text in messages if role == "user"]
    if not users or not users[-1].strip():
        raise RequestError(422, "invalid_request", "messages needs a non-empty user message", [{"field": "messages"}])
    if len(users[-1]) > max_chars:
        raise RequestError(
            422, "invalid_request", f"the user message is over {max_chars} characters", [{"field": "messages"}]
        )
    return ChatPrompt(users[-1].strip(), system or DEFAULT_INSTRUCTION)


def answer_mode(guided_choice: list[str] | None, response_format: dict[str, Any] | None) -> Mode:
    """How a request is answered: a guided choice, a JSON document or text; an unknown format is refused (422)."""
    if guided_choice:
        return "choice"
    format_type = (response_format or {}).get("type", "text")
    if format_type in JSON_FORMATS:
        return "json"
    if format_type == "text":
        return "text"
    raise RequestError(
        422,
        "invalid_request",
        f"response_format type {format_type!r} is not supported",
        [{"field": "response_format.type"}],
    )


def token_budget(requested: int | None, limit: int) -> int:
    """The tokens an answer may generate: what the request asks (default 128), at most the service's limit."""
    return min(requested or DEFAULT_MAX_TOKENS, limit)


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def finish_reason(generated: int, max_tokens: int) -> Literal["stop", "length"]:
    return "length" if generated >= max_tokens else "stop"


def answer(
    server: ModelServer,
    adapter: AdapterRef | None,
    prompt: ChatPrompt,
    *,
    mode: Mode,
    max_tokens: int,
    choices: list[str] | None = None,
) -> ChatAnswer:
    """The whole answer in ``mode`` (``choices``: the guided choices)."""
    if mode == "choice":
        assert choices, "a guided choice needs choices"
        return choose(server, adapter, prompt, choices)
    if mode == "json":
        return answer_json(server, adapter, prompt, max_tokens)
    return complete(server, adapter, prompt, max_tokens)


def choose(server: ModelServer, adapter: AdapterRef | None, prompt: ChatPrompt, choices: list[str]) -> ChatAnswer:
    """The choice whose continuation of the prompt the model scores highest."""

    def run(model: Any, tokenizer: Any) -> ChatAnswer:
        rendered = prompt.render(model, tokenizer)
        scores = continuation_logprobs(model, tokenizer, [rendered], [choices])[0]
        content = choices[max(range(len(choices)), key=scores.__getitem__)]
        return ChatAnswer(content, count_tokens(tokenizer, rendered), count_tokens(tokenizer, content), "stop")

    return server.with_model(adapter, run)


def answer_json(server: ModelServer, adapter: AdapterRef | None, prompt: ChatPrompt, max_tokens: int) -> ChatAnswer:
    """The /analyze result (label, probabilities, importance, reaction, analysis) of the prompt, as JSON; micro-batched
    with /analyze's requests, under the prompt's own instruction."""
    result = server.submit(prompt.text, adapter, max_tokens, instruction=prompt.instruction)
    content = json.dumps(result.summary(), ensure_ascii=False)

    def counted(model: Any, tokenizer: Any) -> ChatAnswer:
        return ChatAnswer(
            content, count_tokens(tokenizer, prompt.render(model, tokenizer)), count_tokens(tokenizer, content), "stop"
        )

    return server.with_model(adapter, counted)


def complete(server: ModelServer, adapter: AdapterRef | None, prompt: ChatPrompt, max_tokens: int) -> ChatAnswer:
    """Greedy generation of at most ``max_tokens``."""

    def run(model: Any, tokenizer: Any) -> ChatAnswer:
        rendered = prompt.render(model, tokenizer)
        pieces: list[str] = []  # the streamed pieces join up to the whole answer (scoring.generate_stream)
        count = generate_stream(model, tokenizer, rendered, max_tokens, pieces.append)
        return ChatAnswer("".join(pieces), count_tokens(tokenizer, rendered), count, finish_reason(count, max_tokens))

    return server.with_model(adapter, run)


_END = object()


async def stream(
    server: ModelServer, adapter: AdapterRef | None, prompt: ChatPrompt, max_tokens: int
) -> AsyncGenerator[str | ChatAnswer, None]:
    """Each new piece of text as the generating thread produces it, then the whole :class:`ChatAnswer`; raises what
    the generation raised. Closing it stops the generation at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def hand_over(item: Any) -> None:  # called on the generating thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def run(model: Any, tokenizer: Any) -> ChatAnswer:
        rendered = prompt.render(model, tokenizer)
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            hand_over(piece)

        count = generate_stream(model, tokenizer, rendered, max_tokens, on_text, stop)
        return ChatAnswer("".join(pieces), count_tokens(tokenizer, rendered), count, finish_reason(count, max_tokens))

    def work() -> None:
        try:
            hand_over((_END, server.with_model(adapter, run)))
        except Exception as exc:  # noqa: BLE001 - raised to the reader of the stream
            log.exception("streamed generation failed")
            hand_over((_END, exc))

    threading.Thread(target=work, name="flashtune-stream", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if isinstance(item, str):
                yield item
                continue
            _, outcome = item
            if isinstance(outcome, Exception):
                raise outcome
            yield outcome
            return
    finally:
        stop.set()  # the client went away (or the stream ended): the generation stops at its next token
