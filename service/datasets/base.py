"""What every dataset parser shares: the result shape, the error, typed access to the upload's options, stars.

Kept apart from ``formats.py`` so that parsers living in their own modules (the SQLite importer) can use them
without an import cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.llm.prompts import Example

MAX_REJECTED_LISTED = 100
DEFAULT_STAR = 3  # a news item's importance when the upload does not say
_T = TypeVar("_T")


class DatasetError(Exception):
    """The upload cannot become a dataset; ``details`` names the line, field, table or column at fault."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


@dataclass
class Parsed:
    format: str
    examples: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)  # a split the format itself defines (time split)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    duplicates_removed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Options:
    """The options of one upload, read with a type each; whatever no parser asked for is an error.

    Values arrive either from the JSON ``options`` field (typed) or from plain form fields (strings), so every
    getter accepts both and names the option when a value does not fit.
    """

    def __init__(self, values: dict[str, Any] | None) -> None:
        self._values = dict(values or {})
        self._used: set[str] = set()

    def _raw(self, name: str) -> Any:
        self._used.add(name)
        value = self._values.get(name)
        return None if value is None or value == "" else value

    def _bad(self, name: str, value: Any, expected: str) -> DatasetError:
        return DatasetError(f"option {name!r} must be {expected}, got {value!r}", {"option": name, "value": value})

    def text(self, name: str, default: _T) -> str | _T:
        value = self._raw(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(name, value, "a string")
        return value.strip()

    def integer(self, name: str, default: _T, low: int | None = None, high: int | None = None) -> int | _T:
        value = self._raw(name)
        if value is None:
            return default
        number: int | None = None
        try:
            as_float = float(value)
            if as_float.is_integer() and not isinstance(value, bool):
                number = int(as_float)
        except (TypeError, ValueError):
            pass
        if number is None or (low is not None and number < low) or (high is not None and number > high):
            raise self._bad(name, value, _range_words("an integer", low, high))
        return number

    def number(self, name: str, default: _T, low: float | None = None, high: float | None = None) -> float | _T:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
            raise self._bad(name, value, _range_words("a number", low, high))
        return number

    def flag(self, name: str, default: bool = False) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise self._bad(name, value, "true or false")

    def items(self, name: str, default: list[Any]) -> list[Any]:
        """A JSON list, or a comma-separated string from a form field."""
        value = self._raw(name)
        if value is None:
            return default
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise self._bad(name, value, "a list")
        return value

    def check_all_used(self, format: str) -> None:
        unknown = sorted(set(self._values) - self._used)
        if unknown:
            raise DatasetError(
                f"unknown option {unknown[0]!r} for format {format!r} (known: {', '.join(sorted(self._used))})",
                {"option": unknown[0], "known": sorted(self._used)},
            )


def star_of(value: Any) -> int:
    """A 1-5 star from a cell (``3.0``, ``"4"``, empty); the default 3 when missing or not a number."""
    try:
        star = round(float(value))
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_STAR
    return min(5, max(1, star))


def _range_words(kind: str, low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} >= {low}"
    return kind
