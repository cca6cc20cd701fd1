"""What a request may hand the engine: checked texts and limits, and the news item an adapter is shown.

A news item may carry ``metadata`` (star, country, calendar figures) and ``market_context`` (pre_ret, volatility,
trend). They go into the model input through :func:`service.llm.prompts.render_input`, the function the dataset
importers build training inputs with, but only the fields the adapter's training inputs carried: a field it never
saw would only be noise to it. :func:`news_input` says what was used and what was left out
(:class:`~service.serving.types.InputContext`). The base alone takes every field.

The checks raise ``RequestError`` (422) naming the request field at fault (``text``, ``items.3.text``, ...);
:func:`check_prompt_format` refuses (409) an adapter whose prompts the served base cannot write as it was trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.core.config import Settings
from service.core.errors import RequestError
from service.core.layout import AdapterRef
from service.llm.modeling import has_chat_template, resolve_base_model
from service.llm.prompts import INPUT_FIELDS, NewsItem
from service.serving.types import InputContext


def checked_text(text: str, *, settings: Settings, field: str) -> str:
    """``text`` stripped; refused when it is over ``max_text_chars`` as sent (the published schema's maxLength) or
    empty once stripped (its pattern ``\\S``)."""
    if len(text) > settings.max_text_chars:
        raise RequestError(
            422, "invalid_request", f"{field} is longer than {settings.max_text_chars} characters", [{"field": field}]
        )
    text = text.strip()
    if not text:
        raise RequestError(422, "invalid_request", f"{field} is empty", [{"field": field}])
    return text


def check_new_tokens(max_new_tokens: int | None, *, settings: Settings) -> None:
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens_limit:
        raise RequestError(
            422,
            "invalid_request",
            f"max_new_tokens is over {settings.max_new_tokens_limit}",
            [{"field": "max_new_tokens"}],
        )


def check_batch_size(count: int, *, settings: Settings) -> None:
    if count > settings.max_batch_items:
        raise RequestError(
            422,
            "invalid_request",
            f"items holds {count} texts; the limit is {settings.max_batch_items}",
            [{"field": "items"}],
        )


def news_input(text: str, given: Mapping[str, Any] | None, known: list[str] | None) -> tuple[NewsItem, InputContext]:
    """The news item with the ``given`` fields the adapter knows (``known``; None: the base alone, all of them),
    and which of them were used and left out."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    used = [f for f in INPUT_FIELDS if f in given and (known is None or f in known)]
    ignored = [f for f in INPUT_FIELDS if f in given and f not in used]
    return NewsItem(text, {f: given[f] for f in used}), InputContext(used, ignored)


def prompt_format_refused(adapter: str, field: str) -> RequestError:
    """The 409 for a ``chat_template`` adapter on a served base whose tokenizer has no chat template (``field``: the
    request field that named the adapter)."""
    return RequestError(
        409,
        "prompt_format_unavailable",
        f"adapter {adapter} was trained with prompt_format 'chat_template', but the served base model's tokenizer "
        "has no chat template, so its prompts cannot be written as it was trained on: use an adapter trained with "
        "prompt_format 'flashtune' (or 'none', the base alone), or give the base its chat template back",
        [
            {
                "field": field,
                "message": "trained with prompt_format 'chat_template'; the served base has no chat template",
            }
        ],
    )


def check_prompt_format(adapter: AdapterRef | None, prompt_format: str, settings: Settings, field: str) -> None:
    """Refuse (409, :func:`prompt_format_refused`) ``adapter``, trained with ``prompt_format``
    (``ModelServer.prompt_format``), where it is ``chat_template`` and the served base's tokenizer has no chat
    template. Checked before the request is queued: rendering its prompt would fail the whole micro-batch it joined.
    The tokenizer is read once (``has_chat_template``), and only for a chat-format adapter."""
    if adapter is None or prompt_format != "chat_template":
        return
    if not has_chat_template(resolve_base_model(settings.base_model, settings)):
        raise prompt_format_refused(adapter.name, field)
