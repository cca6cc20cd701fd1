"""Import the user's finance SQLite database (``events`` + ``event_impacts``) as a labelled, time-split dataset.

The upload is copied to a temporary file and opened read-only (``file:...?mode=ro``) with an authorizer that
allows nothing but reading and ``table_info``: whatever the file holds (triggers, views, odd pragmas) is never
run. The schema is read first and every table and column this module uses comes from the allow-lists below,
checked against that schema; user values (ticker, window, sources) only ever travel as bound parameters.

Labelling follows the user's own pipeline: the return over ``window_min`` minutes after the event, cut into
bearish / neutral / bullish at two thresholds, either fixed or quantiles of the *training* period's returns
(so the validation period never informs its own labels). Validation is the latest share of events by ts_utc.

The input of each example is rendered by :func:`service.llm.prompts.render_input`, the function /analyze uses too:
the text (flash ``content`` or calendar ``name``) and the fields the option ``input_fields`` names (by default the
calendar figures ``previous``/``consensus``/``actual``, as the user's own data reads).

An import is bounded (``Limits``): the join reads at most ``FLASHTUNE_IMPORT_MAX_ROWS`` rows and runs at most
``FLASHTUNE_IMPORT_SECONDS`` (SQLite's progress handler interrupts it, and stops it when the client went away), and an
``event_id`` may appear once in ``events`` and once per ticker and window in ``event_impacts``, as the schema's keys
say, so no file can make the join quadratic. Each refusal is a 4xx naming the limit or the repeated id.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from service.core import scratch
from service.core.capping import cap_join, cap_repr, cap_text
from service.datasets.base import (
    DEFAULT_STAR,
    MAX_INSTRUCTION_CHARS,
    DatasetError,
    Limits,
    Options,
    Parsed,
    Split,
    over_limit,
    star_of,
)
from service.llm.prompts import DEFAULT_INSTRUCTION, METADATA_FIELDS, Example, Label, render_input, render_response

SOURCES = ("flash", "calendar")
# The allow-list: the only identifiers that ever appear in SQL here.
EVENT_COLUMNS = ("event_id", "source", "ts_utc", "content", "star")
CALENDAR_COLUMNS = ("name", "previous", "consensus", "actual")
IMPACT_COLUMNS = ("event_id", "ticker", "window_min", "ret")
FIGURES = ("previous", "consensus", "actual")  # calendar events only
INPUT_COLUMNS = ("country",)  # read only when the option input_fields names it
DEFAULT_INPUT_FIELDS = FIGURES
PROGRESS_STEPS = 10_000  # SQLite virtual-machine steps between checks of the time limit and the cancel flag


@dataclass(frozen=True)
class ImportOptions:
    ticker: str
    window_min: int
    sources: tuple[str, ...]
    min_star: int | None
    label_rule: str  # "quantile" or "fixed"
    cut: tuple[float, float]  # quantiles for "quantile", returns for "fixed"
    validation_fraction: float
    limit: int | None
    seed: int
    instruction: str
    input_fields: tuple[str, ...] = DEFAULT_INPUT_FIELDS


@dataclass(frozen=True, slots=True)
class Event:
    """What an example needs of one joined row (held for every row until the split: kept small)."""

    ts_utc: str
    text: str
    star: int
    ret: float


def read_options(options: Options) -> ImportOptions:
    sources = tuple(str(s).strip() for s in options.items("sources", list(SOURCES)))
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise DatasetError(
            f"option 'sources' must list some of {', '.join(SOURCES)}, got [{cap_join(sources)}]",
            {"option": "sources", "allowed": list(SOURCES)},
        )
    input_fields = tuple(str(f).strip() for f in options.items("input_fields", list(DEFAULT_INPUT_FIELDS)))
    bad = [f for f in input_fields if f not in METADATA_FIELDS]
    if bad:
        raise DatasetError(
            f"option 'input_fields' may list {', '.join(METADATA_FIELDS)} (the database has no {cap_repr(bad[0])})",
            {"option": "input_fields", "allowed": list(METADATA_FIELDS)},
        )
    thresholds = _pair(options, "thresholds", None, low=None, high=None)
    rule = options.text("label_rule", "fixed" if thresholds else "quantile")
    if rule not in ("quantile", "fixed"):
        raise DatasetError("option 'label_rule' must be 'quantile' or 'fixed'", {"option": "label_rule"})
    quantiles = _pair(options, "quantiles", (0.3, 0.7), low=0.0, high=1.0)
    if rule == "fixed" and thresholds is None:
        raise DatasetError(
            "label_rule 'fixed' needs the option 'thresholds' [low, high] (returns, e.g. [-0.0004, 0.0004])",
            {"option": "thresholds"},
        )
    if rule == "quantile" and thresholds is not None:
        raise DatasetError("option 'thresholds' applies only with label_rule 'fixed'", {"option": "thresholds"})
    return ImportOptions(
        ticker=options.text("ticker", "XAUUSD"),
        window_min=options.integer("window_min", 15, low=1),
        sources=sources,
        min_star=options.integer("min_star", None, low=1, high=5),
        label_rule=rule,
        cut=thresholds if rule == "fixed" and thresholds else quantiles or (0.3, 0.7),
        validation_fraction=options.number("validation_fraction", 0.2, low=0.0, high=0.9),
        limit=options.integer("limit", None, low=1),
        seed=options.integer("seed", 0),
        instruction=options.text("instruction", DEFAULT_INSTRUCTION, MAX_INSTRUCTION_CHARS),
        input_fields=input_fields,
    )


def _pair(
    options: Options, name: str, default: tuple[float, float] | None, low: float | None, high: float | None
) -> tuple[float, float] | None:
    """Two ascending numbers, from a JSON list or a form field "a,b"."""
    values = options.items(name, list(default) if default else [])
    if not values:
        return default
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        pair = ()
    if (
        len(pair) != 2
        or not pair[0] < pair[1]
        or (low is not None and pair[0] < low)
        or (high is not None and pair[1] > high)
    ):
        raise DatasetError(
            f"option {name!r} must be two ascending numbers [low, high], got {cap_repr(values)}",
            {"option": name, "value": values},
        )
    return pair[0], pair[1]


def parse_sqlite(
    stream: IO[bytes], options: Options, parsed: Parsed, limits: Limits
) -> Iterator[tuple[Split, Example]]:
    opts = read_options(options)
    with open_readonly(stream, limits) as conn:
        check_schema(conn, opts.sources, opts.input_fields)
        check_unique(conn, opts)
        events = _events(conn, opts, parsed, limits)
        if not events:
            raise DatasetError(_nothing_matched(conn, opts), {"ticker": opts.ticker, "window_min": opts.window_min})
    train, validation = time_split(events, opts.validation_fraction)
    low, high = thresholds(train, opts)
    train, validation = sample(train, validation, opts.limit, opts.seed)
    parsed.extra["import"] = {
        "ticker": opts.ticker,
        "window_min": opts.window_min,
        "sources": list(opts.sources),
        "min_star": opts.min_star,
        "label_rule": opts.label_rule,
        "input_fields": list(opts.input_fields),
        "quantiles": list(opts.cut) if opts.label_rule == "quantile" else None,
        "thresholds": {"low": low, "high": high},
        "events_matched": len(events),
        "limit": opts.limit,
        "seed": opts.seed,
        "train": _period(train),
        "validation": _period(validation),
    }
    return _labelled(train, validation, low, high, opts.instruction)


def _labelled(
    train: list[Event], validation: list[Event], low: float, high: float, instruction: str
) -> Iterator[tuple[Split, Example]]:
    for e in train:
        yield "train", _example(e, label_of(e.ret, low, high), instruction)
    for e in validation:
        yield "validation", _example(e, label_of(e.ret, low, high), instruction)


@contextmanager
def open_readonly(source: bytes | IO[bytes], limits: Limits | None = None) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a private temporary copy of the upload, allowed to read and nothing else, and
    interrupted past ``limits.import_seconds`` or when ``limits.cancel`` is set."""
    limits = limits or Limits()
    fd, name = tempfile.mkstemp(prefix=scratch.prefix("import"), suffix=".db")  # a kill -9 leaves it: scratch.py
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            _copy(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source, out)
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, check_same_thread=False)
        deadline = time.monotonic() + limits.import_seconds
        conn.set_progress_handler(lambda: int(limits.cancel.is_set() or time.monotonic() > deadline), PROGRESS_STEPS)
        try:
            conn.set_authorizer(_authorize)
            conn.row_factory = sqlite3.Row
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # fails now if it is not a database
            yield conn
        except sqlite3.DatabaseError as exc:
            limits.check()
            if time.monotonic() > deadline:
                raise over_limit(
                    f"the import ran longer than {limits.import_seconds:g} s",
                    "FLASHTUNE_IMPORT_SECONDS",
                    limits.import_seconds,
                    "import a smaller database or narrow it with the options ticker, window_min and sources",
                ) from exc
            raise DatasetError(f"the database could not be read: {cap_text(exc)}", {"field": "file"}) from exc
        finally:
            conn.close()
    finally:
        path.unlink(missing_ok=True)


def _copy(source: IO[bytes], out: IO[bytes]) -> None:
    """The upload, byte for byte, except that a WAL-mode header (bytes 18-19 = 2) is marked as a rollback-journal
    database: a read-only open would otherwise look for -wal/-shm files that an upload does not have."""
    source.seek(0)
    start = source.read(100)
    out.write(start[:18] + b"\x01\x01" + start[20:] if start[18:20] == b"\x02\x02" else start)
    shutil.copyfileobj(source, out, 1024 * 1024)
    source.seek(0)


def _authorize(action: int, arg1: str | None, _arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 == "table_info":
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _event_columns(sources: tuple[str, ...], input_fields: tuple[str, ...]) -> tuple[str, ...]:
    return (
        EVENT_COLUMNS
        + (CALENDAR_COLUMNS if "calendar" in sources else ())
        + tuple(c for c in INPUT_COLUMNS if c in input_fields)
    )


def check_schema(
    conn: sqlite3.Connection, sources: tuple[str, ...], input_fields: tuple[str, ...] = DEFAULT_INPUT_FIELDS
) -> None:
    """Every table and column the import uses exists; otherwise a 4xx naming what is missing and what exists."""
    tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    event_columns = _event_columns(sources, input_fields)
    for table, needed in (("events", event_columns), ("event_impacts", IMPACT_COLUMNS)):
        if table not in tables:
            raise DatasetError(
                f"the database has no table '{table}' (tables: {cap_join(tables) or 'none'})",
                {"table": table, "tables": tables},
            )
        # PRAGMA takes no bound parameters; ``table`` is one of the two allow-listed names above, not user input.
        columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DatasetError(
                f"table '{table}' has no column '{missing[0]}' (columns: {cap_join(columns)})",
                {"table": table, "column": missing[0], "missing": missing, "columns": columns},
            )


def check_unique(conn: sqlite3.Connection, opts: ImportOptions) -> None:
    """The schema's keys, which an upload need not declare: ``events.event_id`` is unique, and so is ``event_id``
    per ticker and window in ``event_impacts``. A repeat would multiply the join's rows; it is a 4xx naming it."""
    pair = (opts.ticker, opts.window_min)
    checks = (
        (
            "event_impacts",
            "SELECT event_id, count(*) FROM event_impacts WHERE ticker = ? AND window_min = ? "
            "GROUP BY event_id HAVING count(*) > 1 LIMIT 1",
            f" for ticker {cap_repr(opts.ticker)}, window_min {opts.window_min}",
        ),
        (
            "events",
            "SELECT event_id, count(*) FROM events WHERE event_id IN "
            "(SELECT event_id FROM event_impacts WHERE ticker = ? AND window_min = ?) "
            "GROUP BY event_id HAVING count(*) > 1 LIMIT 1",
            "",
        ),
    )
    for table, sql, where in checks:
        repeated = conn.execute(sql, pair).fetchone()
        if repeated is not None:
            raise DatasetError(
                f"table '{table}' has {repeated[1]} rows with event_id {cap_repr(repeated[0])}{where}; "
                "an event_id may appear once (the key of the schema)",
                {"table": table, "column": "event_id", "event_id": repeated[0], "rows": repeated[1]},
            )


def _events(conn: sqlite3.Connection, opts: ImportOptions, parsed: Parsed, limits: Limits) -> list[Event]:
    """The events with a return for the ticker and window, oldest first; unusable ones go to ``parsed.rejected``."""
    # allow-listed and checked against the schema
    columns = ", ".join(f"e.{c}" for c in _event_columns(opts.sources, opts.input_fields))
    marks = ", ".join("?" for _ in opts.sources)
    sql = (
        f"SELECT {columns}, i.ret FROM events AS e JOIN event_impacts AS i ON i.event_id = e.event_id "
        f"WHERE i.ticker = ? AND i.window_min = ? AND e.source IN ({marks}) ORDER BY e.ts_utc, e.event_id"
    )
    events = []
    for count, row in enumerate(conn.execute(sql, (opts.ticker, opts.window_min, *opts.sources)), start=1):
        if count > limits.import_max_rows:
            raise over_limit(
                f"more than {limits.import_max_rows} rows of events match ticker {cap_repr(opts.ticker)}, "
                f"window_min {opts.window_min}",
                "FLASHTUNE_IMPORT_MAX_ROWS",
                limits.import_max_rows,
                "narrow the import with the options sources, ticker and window_min",
            )
        star = star_of(row["star"]) if row["star"] is not None else DEFAULT_STAR
        if opts.min_star is not None and star < opts.min_star:
            continue
        try:
            text = event_text(row, opts.input_fields)
        except ValueError as exc:  # a field value render_input refuses (too long, a line break)
            parsed.reject(str(exc), event_id=row["event_id"])
            continue
        problem = (
            "no ts_utc"
            if not row["ts_utc"]
            else "no return (ret is NULL)"
            if row["ret"] is None
            else "empty text"
            if not text
            else None
        )
        if problem:
            parsed.reject(problem, event_id=row["event_id"])
            continue
        events.append(Event(str(row["ts_utc"]), text, star, float(row["ret"])))
    return events


def event_text(row: sqlite3.Row | dict[str, Any], input_fields: tuple[str, ...] = DEFAULT_INPUT_FIELDS) -> str:
    """The model input of an event (:func:`render_input`): flash news, its content; calendar events, the name
    and, by default, the figures as the user wrote them (``美国初请失业金人数 前值:23.6 预期:22.5 公布:22.4``); plus
    the star and country when ``input_fields`` names them. Empty when the event has no text."""
    calendar = row["source"] == "calendar"
    text = str((row["name"] if calendar else row["content"]) or "").strip()
    if not text:
        return ""
    fields: dict[str, Any] = {f: row[f] for f in FIGURES if calendar and f in input_fields}
    if "star" in input_fields and row["star"] is not None:
        fields["star"] = star_of(row["star"])
    if "country" in input_fields:
        fields["country"] = row["country"]
    return render_input(text, fields)


def _nothing_matched(conn: sqlite3.Connection, opts: ImportOptions) -> str:
    pairs = conn.execute("SELECT DISTINCT ticker, window_min FROM event_impacts ORDER BY 1, 2 LIMIT 50").fetchall()
    available = cap_join(f"{cap_text(t)}/{w}" for t, w in pairs) or "none"
    return (
        f"no usable events for ticker {cap_repr(opts.ticker)}, window_min {opts.window_min}, "
        f"sources {list(opts.sources)}, min_star {opts.min_star} (ticker/window_min pairs in the database: {available})"
    )


def time_split(events: list[Event], fraction: float) -> tuple[list[Event], list[Event]]:
    """The latest ``fraction`` of events (by ts_utc) for validation; events sharing the cut's timestamp all go
    to validation, so no instant is on both sides."""
    cut = len(events) - round(len(events) * fraction)
    while 0 < cut < len(events) and events[cut - 1].ts_utc == events[cut].ts_utc:
        cut -= 1
    if cut == 0:
        raise DatasetError("validation_fraction leaves no events for training", {"option": "validation_fraction"})
    return events[:cut], events[cut:]


def thresholds(train: list[Event], opts: ImportOptions) -> tuple[float, float]:
    """(low, high) return thresholds: fixed, or quantiles of the training period's returns only."""
    if opts.label_rule == "fixed":
        return opts.cut
    returns = sorted(e.ret for e in train)
    return quantile(returns, opts.cut[0]), quantile(returns, opts.cut[1])


def quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (NumPy's and pandas' default)."""
    position = (len(ordered) - 1) * q
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def label_of(ret: float, low: float, high: float) -> Label:
    """The user's rule: below the low threshold bearish, above the high one bullish, neutral between."""
    return "bearish" if ret < low else "bullish" if ret > high else "neutral"


def sample(
    train: list[Event], validation: list[Event], limit: int | None, seed: int
) -> tuple[list[Event], list[Event]]:
    """At most ``limit`` events, drawn with ``seed`` from each side in proportion; time order kept."""
    total = len(train) + len(validation)
    if limit is None or limit >= total:
        return train, validation
    rng = random.Random(seed)
    keep_train = max(1, round(limit * len(train) / total))
    keep_validation = min(len(validation), limit - keep_train)

    def draw(events: list[Event], k: int) -> list[Event]:
        return [events[i] for i in sorted(rng.sample(range(len(events)), k))]

    return draw(train, keep_train), draw(validation, keep_validation)


def _example(event: Event, label: Label, instruction: str) -> Example:
    return Example(instruction, event.text, render_response(label, event.star))


def _period(events: list[Event]) -> dict[str, Any]:
    return {
        "events": len(events),
        "from": events[0].ts_utc if events else None,
        "until": events[-1].ts_utc if events else None,
    }
