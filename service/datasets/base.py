"""What every dataset parser shares: the result, the error, the limits, the example collector, typed options, stars.

Kept apart from ``formats.py`` so that parsers living in their own modules (the SQLite importer) can use them
without an import cycle.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from service.core.capping import cap_join, cap_repr, cap_text
from service.llm.prompts import INPUT_FIELDS, Example, Label, input_fields_used

MAX_REJECTED_LISTED = 100
MAX_REASON_CHARS = 300
MAX_OPTION_CHARS = 200  # a name: a column, a ticker, a rule
MAX_INSTRUCTION_CHARS = 4000  # the option 'instruction' goes into every example: bounded like an /analyze text
DEFAULT_STAR = 3  # a news item's importance when the upload does not say
_T = TypeVar("_T")
Split = Literal["train", "validation"]


class DatasetError(Exception):
    """The upload cannot become a dataset; ``details`` names the line, field, table, column or limit at fault."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


@dataclass(frozen=True)
class Limits:
    """How much one upload may make the server do (``Settings``: ``FLASHTUNE_MAX_DATASET_EXAMPLES``,
    ``FLASHTUNE_IMPORT_MAX_ROWS``, ``FLASHTUNE_IMPORT_SECONDS``); ``cancel`` is set when the client went away."""

    max_examples: int = 1_000_000
    import_max_rows: int = 500_000
    import_seconds: float = 120.0
    cancel: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancel.is_set():
            raise DatasetError("the upload was cancelled: the client went away", {"limit": "cancelled"})


def over_limit(what: str, setting: str, value: float, hint: str) -> DatasetError:
    """The 422 of a limit: says which one (its setting and value) and what to change."""
    return DatasetError(f"{what}, over the limit of {value:g} ({setting}); {hint}", {"limit": setting, "max": value})


@dataclass
class Parsed:
    """What parsing an upload found. The examples themselves go to the collector's writer (the store's
    ``examples.jsonl``) as they are parsed; ``examples`` and ``validation`` are filled only when asked to keep them."""

    format: str
    examples: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)  # a split the format itself defines (time split)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_REJECTED_LISTED
    rejected_count: int = 0
    duplicates_removed: int = 0
    num_train: int = 0
    num_validation: int = 0
    labels: Counter[Label | None] = field(default_factory=Counter)
    input_fields: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def reject(self, reason: str, **where: Any) -> None:
        """One line (row, event) left out, with why; only the first ``MAX_REJECTED_LISTED`` are listed."""
        self.rejected_count += 1
        if len(self.rejected) < MAX_REJECTED_LISTED:
            place = {k: v if isinstance(v, int) else cap_text(v) for k, v in where.items()}
            self.rejected.append({**place, "reason": cap_text(reason, MAX_REASON_CHARS)})


class Collector:
    """Takes an upload's examples as they are parsed: drops exact repeats (a validation example equal to an earlier
    one too: it would leak), counts labels and input fields, and hands each kept example to ``write``.

    Repeats are found by a 64-bit hash of each example (two distinct examples share one with a chance of about
    n^2 / 2^65: 3e-8 for a million), so memory grows by about 70 bytes per example, not by the examples themselves;
    ``limits.max_examples`` bounds that.
    """

    def __init__(
        self,
        parsed: Parsed,
        limits: Limits,
        write: Callable[[Example, Split], None] | None = None,
        keep: bool = False,
    ) -> None:
        self.parsed, self.limits, self.write, self.keep = parsed, limits, write, keep
        self._seen: set[int] = set()
        self._fields: set[str] = set()
        self._offered = 0

    def add(self, example: Example, split: Split = "train") -> None:
        self._offered += 1
        if self._offered > self.limits.max_examples:
            raise over_limit(
                f"the file has more than {self.limits.max_examples} examples",
                "FLASHTUNE_MAX_DATASET_EXAMPLES",
                self.limits.max_examples,
                "split it into several datasets",
            )
        if self._offered % 4096 == 0:
            self.limits.check()
        key = hash((example.instruction, example.input, example.output))
        if key in self._seen:
            self.parsed.duplicates_removed += 1
            return
        self._seen.add(key)
        parsed = self.parsed
        if split == "train":
            parsed.num_train += 1
        else:
            parsed.num_validation += 1
        parsed.labels[example.label] += 1
        if len(self._fields) < len(INPUT_FIELDS) and ":" in example.input:  # every field is "word:value"
            self._fields.update(input_fields_used([example.input]))
        if self.write is not None:
            self.write(example, split)
        if self.keep:
            (parsed.examples if split == "train" else parsed.validation).append(example)

    def finish(self) -> Parsed:
        self.parsed.input_fields = [name for name in INPUT_FIELDS if name in self._fields]
        self._seen = set()
        return self.parsed


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
        return DatasetError(
            f"option {cap_repr(name)} must be {expected}, got {cap_repr(value)}", {"option": name, "value": value}
        )

    def text(self, name: str, default: _T, max_chars: int = MAX_OPTION_CHARS) -> str | _T:
        value = self._raw(name)
        if value is None:
            return default
        if not isinstance(value, str) or len(value) > max_chars:
            raise self._bad(name, value, f"a string of at most {max_chars} characters")
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
                f"unknown option {cap_repr(unknown[0])} for format {format!r} (known: {cap_join(sorted(self._used))})",
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
