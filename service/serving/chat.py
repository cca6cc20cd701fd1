"""Chat completions on the served model (``POST /v1/chat/completions``): one prompt, three ways to answer it.

A conversation maps onto the training prompt (:func:`chat_prompt`): the system (and developer) messages become the
instruction and the last user message the input, rendered in the ``prompt_format`` the adapter was trained with (its
training_info.json, :meth:`ModelServer.prompt_format`; ``chat_template``: through the tokenizer's chat template), as
/analyze renders it, so an adapter sees what it was trained on; the other messages are not shown to the model.
Every message and guided choice is bounded in characters before anything is tokenised (:func:`chat_prompt`,
:func:`check_choices`), and the prompt in tokens before the model runs (:func:`fit`): the input is clipped so that
the prompt stays within ``max_chat_prompt_tokens`` and leaves room in the model's context for ``max_tokens``, as
/analyze clips it; an instruction that leaves no room is refused.
Every answer shows the model that prompt (:meth:`ChatPrompt.render`) and counts ``prompt_tokens`` on it:

- ``choice`` (``guided_choice``): choices that name the three labels (``利好``, ``bearish``, ``看涨``, ``...属于利空``)
  are answered by /analyze's own scorer (:meth:`ModelServer.submit`): the choice of the label it gives the highest
  probability, so the two always agree. Other choices are scored as continuations of the prompt at the label's
  place in the standard response, after the importance /analyze chose (``这是一条4星级的财经快讯，属于``);
- ``json`` (``response_format`` ``json_object``): the /analyze result of the prompt's input and instruction;
- ``text``: generated. Greedy without sampling options (the engine's decoding, CUDA graphs where it has them); with
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs`` or ``n`` through ``service.llm.sampling``.

:func:`stream` runs the generation in a thread of its own and hands each new piece of text, as its token is
generated, through a thread-safe hand-off into an asyncio queue that the response reads, so the event loop never
waits on the model. Closing the stream (the client went away) or setting the ``stop`` event of :func:`answer` (the
route's disconnect watch) stops the generation at its next token. Everything runs on the engine's model through
:meth:`ModelServer.with_model` (or the micro-batched :meth:`ModelServer.submit`), holding the model lock as /analyze
does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

from service.core.errors import RequestError
from service.core.layout import AdapterRef
from service.llm.prompts import (
    DEFAULT_INSTRUCTION,
    LABEL_PREFIX_TEMPLATE,
    Label,
    in_format,
    normalise_label,
    parse_label,
)
from service.llm.prompts import render_prompt as render_training_prompt
from service.llm.sampling import Sampling, TokenLogprob, new_generator, sample
from service.llm.scoring import RESPONSE_BUDGET, Text, build_prompts, continuation_logprobs, generate_stream
from service.serving.inputs import prompt_format_refused
from service.serving.types import Analysis

log = logging.getLogger("flashtune.inference")
T = TypeVar("T")
DEFAULT_MAX_TOKENS = 128
MIN_INPUT_TOKENS = 16  # of the news text, at least, in every prompt
MAX_CHOICE_CHARS = 200
MAX_CHOICE_TOKENS = 64
Mode = Literal["choice", "json", "text"]
Finish = Literal["stop", "length"]


def invalid(message: str, *fields: str, status: int = 422) -> RequestError:
    return RequestError(status, "invalid_request", message, [{"field": f} for f in fields])


class Engine(Protocol):
    """The serving engine's public doors chat uses (:class:`~service.serving.engine.ModelServer`)."""

    def submit(
        self, text: Text, adapter: AdapterRef | None, max_new_tokens: int | None, instruction: str = ...
    ) -> Analysis: ...

    def with_model(self, adapter: AdapterRef | None, fn: Callable[[Any, Any], T]) -> T: ...

    def count_tokens(self, text: str) -> int: ...

    def prompt_format(self, adapter: AdapterRef | None) -> str: ...


# ------------------------------------------------------------------------------------------------- the prompt
@dataclass(frozen=True)
class ChatPrompt:
    """The training prompt a conversation maps to: its input (the last user message) and its instruction, with the
    request fields they came from (for errors), and the format its adapter was trained with (:func:`fit` sets it)."""

    text: str
    instruction: str
    input_field: str = "messages"
    instruction_fields: tuple[str, ...] = ()
    prompt_format: str = "flashtune"  # service/llm/prompts.py PROMPT_FORMATS

    def render(self, model: Any, tokenizer: Any) -> str:
        """The prompt the model sees: the training prompt in its ``prompt_format``, the input clipped so that prompt
        and response fit the model's context (``service.llm.scoring.build_prompts``, the builder of every serving
        path)."""
        text = in_format(self.text, self.prompt_format)
        return build_prompts(model, tokenizer, [text], [self.instruction])[0]


def chat_prompt(messages: Iterable[tuple[str, str]], *, max_chars: int, max_total_chars: int) -> ChatPrompt:
    """The prompt of a conversation given as ``(role, text)`` pairs: the system and developer messages joined are
    the instruction (none: the default one), the last user message the input. Refused (422) without a non-empty
    user message, with a message over ``max_chars`` (naming ``messages[i].content``) or with all of them together
    over ``max_total_chars``."""
    messages = list(messages)
    total = 0
    for i, (_, text) in enumerate(messages):
        if len(text) > max_chars:
            raise invalid(f"messages[{i}] is over {max_chars} characters", f"messages[{i}].content")
        total += len(text)
    if total > max_total_chars:
        raise invalid(f"the messages hold {total} characters together; the limit is {max_total_chars}", "messages")
    system = [i for i, (role, _) in enumerate(messages) if role in ("system", "developer")]
    users = [i for i, (role, _) in enumerate(messages) if role == "user"]
    if not users or not messages[users[-1]][1].strip():
        raise invalid("messages needs a non-empty user message", "messages")
    instruction = "\n".join(messages[i][1] for i in system).strip()
    return ChatPrompt(
        messages[users[-1]][1].strip(),
        instruction or DEFAULT_INSTRUCTION,
        f"messages[{users[-1]}].content",
        tuple(f"messages[{i}].content" for i in system) if instruction else (),
    )


def check_choices(choices: list[str], *, room_chars: int) -> None:
    """Guided choices: each non-empty and at most MAX_CHOICE_CHARS, together at most ``room_chars`` (what the
    messages left of ``max_chat_chars``); 422 naming ``guided_choice[i]``."""
    for i, choice in enumerate(choices):
        if not choice.strip() or len(choice) > MAX_CHOICE_CHARS:
            raise invalid(f"guided_choice[{i}] must be 1 to {MAX_CHOICE_CHARS} characters", f"guided_choice[{i}]")
    if sum(map(len, choices)) > room_chars:
        raise invalid("the messages and guided_choice together are over FLASHTUNE_MAX_CHAT_CHARS", "guided_choice")


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_length(model: Any, tokenizer: Any) -> int:
    """The model's context, as ``build_prompts`` reads it."""
    return min(int(tokenizer.model_max_length), int(getattr(model.config, "max_position_embeddings", 1 << 30)))


# ------------------------------------------------------------------------------------------------ the request
@dataclass(frozen=True)
class Options:
    """How a request is answered (built and checked from the request by ``service.api.schemas.chat``)."""

    mode: Mode = "text"
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_field: str = "max_tokens"
    n: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    choices: tuple[str, ...] = ()

    @property
    def plain(self) -> bool:
        """Greedy, one answer, no stop strings, no logprobs: the engine's own decoding."""
        s = self.sampling
        return self.n == 1 and s.temperature == 0 and s.top_logprobs is None and not s.stop

    @property
    def answer_tokens(self) -> int:
        """The context a text answer needs beside the prompt (the others are /analyze's, which makes its room)."""
        return self.max_tokens if self.mode == "text" else 0


@dataclass(frozen=True)
class Fitted:
    prompt: ChatPrompt  # its input clipped to fit
    prompt_tokens: int  # of the rendered prompt


def fit(server: Engine, adapter: AdapterRef | None, prompt: ChatPrompt, options: Options, limit: int) -> Fitted:
    """The prompt in ``adapter``'s prompt format, clipped to at most ``limit`` tokens and to what the model's
    context leaves beside the answer; refused (422) when the instruction leaves the input no room (naming the system
    messages, or ``max_tokens``) or a guided choice is over MAX_CHOICE_TOKENS, and (409, naming ``model``) when the
    adapter was trained with ``prompt_format`` ``chat_template`` and the served base's tokenizer has no chat
    template (``service.serving.inputs.prompt_format_refused``)."""
    prompt = replace(prompt, prompt_format=server.prompt_format(adapter))

    def run(model: Any, tokenizer: Any) -> Fitted:
        if prompt.prompt_format == "chat_template" and getattr(tokenizer, "chat_template", None) is None:
            raise prompt_format_refused(adapter.name if adapter else "none", "model")
        for i, choice in enumerate(options.choices):
            if count_tokens(tokenizer, choice) > MAX_CHOICE_TOKENS:
                raise invalid(f"guided_choice[{i}] is over {MAX_CHOICE_TOKENS} tokens", f"guided_choice[{i}]")
        context = context_length(model, tokenizer)
        room = min(limit, context - options.answer_tokens)
        scaffold = count_tokens(
            tokenizer, render_training_prompt("x", prompt.instruction, prompt.prompt_format, tokenizer)
        )
        if room - scaffold < MIN_INPUT_TOKENS:
            blamed = prompt.instruction_fields or (options.max_tokens_field,)
            raise invalid(
                f"the instruction takes {scaffold} tokens of the {room} the prompt may have (the smaller of "
                f"FLASHTUNE_MAX_CHAT_PROMPT_TOKENS {limit} and the model's context {context} less "
                f"{options.answer_tokens} for the answer): shorten {' and '.join(blamed)}",
                *blamed,
            )
        ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        keep = min(room - scaffold, max(context - RESPONSE_BUDGET, MIN_INPUT_TOKENS))  # build_prompts' clip too
        clipped = prompt
        if len(ids) > keep:  # keep the head, where the facts are (as /analyze clips)
            clipped = replace(prompt, text=str(tokenizer.decode(ids[:keep], skip_special_tokens=True)))
        return Fitted(clipped, count_tokens(tokenizer, clipped.render(model, tokenizer)))

    return server.with_model(adapter, run)


# ------------------------------------------------------------------------------------------------ the answers
@dataclass(frozen=True)
class Choice:
    content: str
    finish_reason: Finish
    tokens: int  # generated (for a guided choice or JSON: the answer's tokens)
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ChatAnswer:
    choices: list[Choice]
    prompt_tokens: int  # of the rendered (clipped) prompt

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


@dataclass(frozen=True)
class Piece:
    """A new piece of choice ``index``'s text, with the logprobs of the tokens it completes."""

    index: int
    text: str
    logprobs: list[TokenLogprob]


OnPiece = Callable[[Piece], None]


def finish_reason(generated: int, max_tokens: int) -> Finish:
    return "length" if generated >= max_tokens else "stop"


def answer(
    server: Engine,
    adapter: AdapterRef | None,
    fitted: Fitted,
    options: Options,
    stop: threading.Event | None = None,
) -> ChatAnswer:
    """The whole answer; setting ``stop`` ends a generated one at its next token."""
    if options.mode == "choice":
        return choose(server, adapter, fitted, list(options.choices))
    if options.mode == "json":
        return answer_json(server, adapter, fitted, options.max_tokens)
    return complete(server, adapter, fitted, options, stop or threading.Event(), None)


def choice_label(choice: str) -> Label | None:
    """The label a guided choice names (``bullish``, ``利空``, ``看涨``, ``…属于中性``, ``-1``), if any."""
    return normalise_label(choice) or parse_label(choice)


def choose(server: Engine, adapter: AdapterRef | None, fitted: Fitted, choices: list[str]) -> ChatAnswer:
    """The choice /analyze's scorer prefers (see the module)."""
    prompt = fitted.prompt
    result = server.submit(prompt.text, adapter, 0, instruction=prompt.instruction)
    labels = [choice_label(c) for c in choices]
    if all(labels) and len(set(labels)) == len(labels):
        probs = result.prediction.probs
        scores = [probs[label] for label in labels if label is not None]
    else:
        prefix = LABEL_PREFIX_TEMPLATE.format(star=result.prediction.importance)

        def at_label(model: Any, tokenizer: Any) -> list[float]:
            return continuation_logprobs(model, tokenizer, [prompt.render(model, tokenizer) + prefix], [choices])[0]

        scores = server.with_model(adapter, at_label)
    content = choices[max(range(len(choices)), key=scores.__getitem__)]
    return ChatAnswer([Choice(content, "stop", server.count_tokens(content))], fitted.prompt_tokens)


def answer_json(server: Engine, adapter: AdapterRef | None, fitted: Fitted, max_tokens: int) -> ChatAnswer:
    """The /analyze result (label, probabilities, importance, reaction, analysis) of the prompt, as JSON; micro-batched
    with /analyze's requests, under the prompt's own instruction."""
    prompt = fitted.prompt
    result = server.submit(prompt.text, adapter, max_tokens, instruction=prompt.instruction)
    content = json.dumps(result.summary(), ensure_ascii=False)
    return ChatAnswer([Choice(content, "stop", server.count_tokens(content))], fitted.prompt_tokens)


def complete(
    server: Engine,
    adapter: AdapterRef | None,
    fitted: Fitted,
    options: Options,
    stop: threading.Event,
    on_piece: OnPiece | None,
) -> ChatAnswer:
    """Generated text: ``options.n`` answers of at most ``options.max_tokens``; ``on_piece`` gets each piece."""

    def run(model: Any, tokenizer: Any) -> list[Choice]:
        rendered = fitted.prompt.render(model, tokenizer)
        if options.plain:
            pieces: list[str] = []  # the streamed pieces join up to the whole answer (scoring.generate_stream)

            def on_text(piece: str) -> None:
                pieces.append(piece)
                if on_piece is not None:
                    on_piece(Piece(0, piece, []))

            count = generate_stream(model, tokenizer, rendered, options.max_tokens, on_text, stop)
            return [Choice("".join(pieces), finish_reason(count, options.max_tokens), count)]
        generator = new_generator(next(model.parameters()).device, options.seed)
        choices = []
        for index in range(options.n):
            if stop.is_set():
                break
            hand_on = None if on_piece is None else _indexed(on_piece, index)
            made = sample(model, tokenizer, rendered, options.max_tokens, options.sampling, generator, hand_on, stop)
            choices.append(Choice(made.text, made.finish_reason, made.tokens, made.logprobs))
        return choices

    choices = server.with_model(adapter, run)
    if stop.is_set():
        log.info(
            "chat completion stopped after %d generated tokens (max_tokens %d, n %d): the client went away",
            sum(c.tokens for c in choices),
            options.max_tokens,
            options.n,
        )
    return ChatAnswer(choices, fitted.prompt_tokens)


def _indexed(on_piece: OnPiece, index: int) -> Callable[[str, list[TokenLogprob]], None]:
    return lambda text, logprobs: on_piece(Piece(index, text, logprobs))


_END = object()


async def stream(
    server: Engine, adapter: AdapterRef | None, fitted: Fitted, options: Options
) -> AsyncGenerator[Piece | ChatAnswer, None]:
    """Each new :class:`Piece` as the generating thread produces it, then the whole :class:`ChatAnswer`; raises what
    the generation raised. Closing it stops the generation at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def hand_over(item: Any) -> None:  # called on the generating thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def work() -> None:
        try:
            hand_over((_END, complete(server, adapter, fitted, options, stop, hand_over)))
        except Exception as exc:  # noqa: BLE001 - raised to the reader of the stream
            log.exception("streamed generation failed")
            hand_over((_END, exc))

    threading.Thread(target=work, name="flashtune-stream", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if isinstance(item, Piece):
                yield item
                continue
            _, outcome = item
            if isinstance(outcome, Exception):
                raise outcome
            yield outcome
            return
    finally:
        stop.set()  # the client went away (or the stream ended): the generation stops at its next token
