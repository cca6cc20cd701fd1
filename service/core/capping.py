"""What an error may echo of a request, capped: values, lists and nesting bounded whatever came in.

A refusal names what is at fault and often repeats the offending value or the choices there were (a CSV header,
a database's tables). Those come from the caller and can be megabytes, so every echo goes through here: a value is
cut to ``MAX_CHARS`` characters (followed by how many more there were), a list to ``MAX_ITEMS`` items followed by
``"and N more"``, nesting to ``MAX_DEPTH`` levels, and a whole message to ``MAX_MESSAGE_CHARS``. Capping twice
changes nothing. The API's error handler
(``service/api/errors.py``) caps every error body with :func:`capped`; code that builds a message from a caller's
values uses :func:`cap_text`, :func:`cap_repr` and :func:`cap_join` so the message is never big in the first place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MAX_CHARS = 200
MAX_ITEMS = 20
MAX_DEPTH = 6
MAX_MESSAGE_CHARS = 2000
MORE_KEY = "..."  # the key that says how many entries of a capped mapping are left out
SLACK = 40  # a text this much over its limit is kept whole: room for the "(N more characters)" of a capped one


def more(count: int) -> str:
    return f"and {count} more"


def cap_text(value: object, limit: int = MAX_CHARS) -> str:
    """``value`` as text, cut to ``limit`` characters with how many were left out."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes | bytearray):
        shown = bytes(value[:limit]).decode("utf-8", "replace")
        return shown if len(value) <= limit else f"{shown}... ({len(value) - limit} more bytes)"
    elif isinstance(value, list | tuple | set | frozenset | Mapping):
        text = repr(capped(value))
    else:
        text = str(value)
    if len(text) <= limit + SLACK:  # so that capping a capped text changes nothing
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def cap_repr(value: object, limit: int = MAX_CHARS) -> str:
    """``repr(value)`` for a message (``'ab'``), built from the capped value, never from all of it."""
    if isinstance(value, str):
        return (
            repr(value)
            if len(value) <= limit + SLACK
            else f"{value[:limit]!r}... ({len(value) - limit} more characters)"
        )
    return cap_text(repr(capped(value)), limit)


def cap_join(items: Iterable[object], separator: str = ", ", limit: int = MAX_ITEMS) -> str:
    """The first ``limit`` items, each capped, joined; then ``and N more`` when there were more."""
    shown: list[str] = []
    left = 0
    for item in items:
        if len(shown) < limit:
            shown.append(cap_text(item))
        else:
            left += 1
    return separator.join(shown) + (f" {more(left)}" if left else "")


def cap_items(items: Iterable[Any], limit: int = MAX_ITEMS, depth: int = 0) -> list[Any]:
    """A list of at most ``limit + 1`` entries: the first ``limit`` capped, then ``"and N more"``.

    A list of exactly ``limit + 1`` entries is kept whole, so capping a capped list changes nothing.
    """
    values = items if isinstance(items, list | tuple) else list(items)
    if len(values) <= limit + 1:
        return [capped(v, depth + 1) for v in values]
    return [capped(v, depth + 1) for v in values[:limit]] + [more(len(values) - limit)]


def capped(value: Any, depth: int = 0) -> Any:
    """A JSON-like value with every string, list and mapping in it capped (see the module's docstring)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str | bytes | bytearray):
        return cap_text(value)
    if depth >= MAX_DEPTH:
        return "..."
    if isinstance(value, Mapping):
        entries = list(value.items())
        kept = entries if len(entries) <= MAX_ITEMS + 1 else entries[:MAX_ITEMS]
        result = {cap_text(str(k)): capped(v, depth + 1) for k, v in kept}
        if len(kept) < len(entries):
            result[MORE_KEY] = more(len(entries) - len(kept))
        return result
    if isinstance(value, list | tuple | set | frozenset):
        return cap_items(list(value), depth=depth)
    return cap_text(str(value))


def cap_message(message: str) -> str:
    return cap_text(message, MAX_MESSAGE_CHARS)
