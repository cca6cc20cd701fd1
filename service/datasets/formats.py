"""Parsing uploads into examples. Each parser yields every good example and records every rejected line with why.

Formats are detected from the content unless the caller names one. A parser never executes anything it reads.
Uploads are read from their file as a stream (``service/datasets/lines.py``): the examples go one by one to a
:class:`~service.datasets.base.Collector`, which drops repeats and hands them on (the store writes them to disk),
so parsing holds one line and a digest per example in memory, not the file. One function per format; the JSON
Lines formats share the line reader, the label-carrying formats (CSV, the SQLite database) write their outputs with
:func:`service.llm.prompts.render_response`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from service.core.capping import cap_join, cap_repr, cap_text
from service.datasets.base import (
    DEFAULT_STAR,
    MAX_INSTRUCTION_CHARS,
    MAX_REJECTED_LISTED,
    Collector,
    DatasetError,
    Limits,
    Options,
    Parsed,
    Split,
    star_of,
)
from service.datasets.lines import MAX_ROW_BYTES, Lines, head, is_blank, size_words
from service.datasets.sqlite_import import parse_sqlite
from service.llm.prompts import (
    DEFAULT_INSTRUCTION,
    INPUT_FIELDS,
    Example,
    normalise_label,
    render_input,
    render_response,
)

__all__ = ["MAX_REJECTED_LISTED", "DatasetError", "Parsed", "detect_format", "parse", "parse_stream"]

Examples = Iterator[tuple[Split, Example]]
Parser = Callable[[IO[bytes], Options, Parsed, Limits], Examples]


def detect_format(data: bytes) -> str:
    """The format of an upload from its first bytes (4 KiB are enough)."""
    start = data[:4096].lstrip()
    if start.startswith(b"SQLite format 3\x00"):
        return "sqlite"
    if start.startswith(b"["):
        raise DatasetError(
            "the file is a JSON array; upload JSON Lines (one object per line) instead", {"field": "file"}
        )
    if start.startswith(b"{"):
        first = start.split(b"\n", 1)[0]
        return "chat_jsonl" if b'"messages"' in first else "instruction_jsonl"
    return "csv"


# ------------------------------------------------------------------------------------------- JSON Lines formats
def _json_records(stream: IO[bytes], parsed: Parsed, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each good line; bad lines go to ``parsed.rejected`` with the reason."""
    lines = Lines(stream, limits)
    for raw in lines.raw():
        number = lines.number
        if raw is None:
            parsed.reject(f"longer than {size_words(MAX_ROW_BYTES)}", line=number)
            continue
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            parsed.reject(f"not UTF-8 (byte {exc.start} of the line)", line=number)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            parsed.reject(f"bad JSON: {exc.msg} at column {exc.colno}", line=number)
            continue
        except RecursionError:
            parsed.reject("bad JSON: nested too deeply", line=number)
            continue
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            parsed.reject(f"bad JSON: {exc}", line=number)
            continue
        if not isinstance(record, dict):
            parsed.reject("not a JSON object", line=number)
            continue
        yield number, record


def parse_instruction_jsonl(stream: IO[bytes], options: Options, parsed: Parsed, limits: Limits) -> Examples:
    """Alpaca-style lines: ``instruction``, optional ``input``, ``output``."""
    for number, record in _json_records(stream, parsed, limits):
        problem = _instruction_problem(record)
        if problem:
            parsed.reject(problem, line=number)
            continue
        instruction, text = str(record.get("instruction") or "").strip(), str(record.get("input") or "")
        yield "train", Example(instruction, text, record["output"].strip())


def _instruction_problem(record: dict[str, Any]) -> str | None:
    for name in ("instruction", "output"):
        if name not in record:
            return f"missing field '{name}'"
    for name in ("instruction", "input", "output"):
        if name in record and record[name] is not None and not isinstance(record[name], str):
            return f"field '{name}' must be a string"
    if not (record["output"] or "").strip():
        return "empty output"
    if not (record["instruction"] or "").strip() and not (record.get("input") or "").strip():
        return "empty instruction and input"
    return None


CHAT_ROLES = ("system", "user", "assistant")
ROLE_WORDS = {"user": "用户", "assistant": "助手"}


def parse_chat_jsonl(stream: IO[bytes], options: Options, parsed: Parsed, limits: Limits) -> Examples:
    """OpenAI fine-tuning lines ``{"messages": [...]}``: system -> instruction, user -> input, last assistant -> output.

    Without a system message the user's message becomes the instruction (the prompt then reads as the user wrote
    it). Turns before the last assistant message are kept, prefixed with who spoke, when there is more than one.
    """
    for number, record in _json_records(stream, parsed, limits):
        example = _chat_example(record)
        if isinstance(example, str):
            parsed.reject(example, line=number)
        else:
            yield "train", example


def _chat_example(record: dict[str, Any]) -> Example | str:
    """The example of one chat record, or the reason it cannot be one."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing field 'messages' (a non-empty list)"
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            return f"messages[{i}] needs a role of {', '.join(CHAT_ROLES)}"
        content = _content_text(message.get("content"))
        if content is None:
            return f"messages[{i}].content must be a string or a list of text parts"
        turns.append((message["role"], content.strip()))
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        return "no assistant message"
    if not turns[last][1]:
        return "empty output (the last assistant message is empty)"
    system = "\n".join(text for role, text in turns[:last] if role == "system" and text)
    dialogue = [(role, text) for role, text in turns[:last] if role != "system" and text]
    if not any(role == "user" for role, _ in dialogue):
        return "no user message before the last assistant message"
    if len(dialogue) == 1:
        prompt = dialogue[0][1]
    else:
        prompt = "\n\n".join(f"{ROLE_WORDS[role]}: {text}" for role, text in dialogue)
    return Example(system, prompt, turns[last][1]) if system else Example(prompt, "", turns[last][1])


def _content_text(content: Any) -> str | None:
    """Message content as text: a string, or the text parts of a list (OpenAI's content-parts form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


# -------------------------------------------------------------------------------------------------------- CSV
@dataclass(frozen=True)
class _Columns:
    """Where a CSV file's values are (column indexes) and the names its rejections quote (capped)."""

    text: int
    label: int
    star: int | None
    fields: dict[str, int]
    names: tuple[str, str]
    instruction: str


def parse_csv(stream: IO[bytes], options: Options, parsed: Parsed, limits: Limits) -> Examples:
    """A text column and a label column (-1/0/1 or bearish/neutral/bullish); outputs in the standard format."""
    delimiter = options.text("delimiter", ",")
    if len(delimiter) != 1:
        raise DatasetError("option 'delimiter' must be one character", {"option": "delimiter"})
    lines = Lines(stream, limits)
    reader = csv.reader(lines.text(), delimiter=delimiter)
    header = [name.strip() for name in _next_row(reader, lines) or []]
    if not any(header):
        raise DatasetError("the CSV file has no header row", {"line": 1})
    text_at = _column(header, options.text("text_column", None), ("text", "content"), "text_column")
    label_at = _column(header, options.text("label_column", None), ("label",), "label_column")
    star_name = options.text("star_column", None)
    star_at = _column(header, star_name, ("star",), "star_column") if star_name or "star" in header else None
    columns = _Columns(
        text_at,
        label_at,
        star_at,
        _input_columns(header, options),
        (cap_text(header[text_at]), cap_text(header[label_at])),
        options.text("instruction", DEFAULT_INSTRUCTION, MAX_INSTRUCTION_CHARS),
    )
    parsed.extra["columns"] = {
        "text": columns.names[0],
        "label": columns.names[1],
        "star": cap_text(header[star_at]) if star_at is not None else None,
        "input_fields": {name: cap_text(header[at]) for name, at in columns.fields.items()},
    }
    return _csv_examples(reader, lines, columns, parsed)


def _csv_examples(reader: Any, lines: Lines, columns: _Columns, parsed: Parsed) -> Examples:
    line = reader.line_num
    while (row := _next_row(reader, lines)) is not None:
        start, line = line + 1, reader.line_num  # a quoted field may span lines: report where the row starts
        if not any(cell.strip() for cell in row):
            continue
        example = _csv_example(row, columns)
        if isinstance(example, str):
            parsed.reject(example, line=start)
        else:
            yield "train", example


def _csv_example(row: list[str], columns: _Columns) -> Example | str:
    """The example of one CSV row, or the reason it cannot be one."""
    text = row[columns.text].strip() if columns.text < len(row) else ""
    raw_label = row[columns.label].strip() if columns.label < len(row) else ""
    label = normalise_label(raw_label)
    if not text:
        return f"empty text (column '{columns.names[0]}')"
    if label is None:
        what = (
            "empty label" if not raw_label else f"label {cap_repr(raw_label)} is not -1/0/1 or bearish/neutral/bullish"
        )
        return f"{what} (column '{columns.names[1]}')"
    star_at = columns.star
    star = star_of(row[star_at]) if star_at is not None and star_at < len(row) else DEFAULT_STAR
    values = {name: row[at] if at < len(row) else None for name, at in columns.fields.items()}
    try:
        model_input = render_input(text, values)
    except ValueError as exc:
        return str(exc)
    return Example(columns.instruction, model_input, render_response(label, star))


def _next_row(reader: Any, lines: Lines) -> list[str] | None:
    """The next CSV record, or None at the end; a malformed record (a field over the csv module's limit of
    131,072 characters, a NUL byte) ends the file with a 4xx naming its line."""
    try:
        row: list[str] | None = next(reader, None)
    except csv.Error as exc:
        problem = str(exc)
        if "field limit" in problem:
            problem = f"a field is longer than {csv.field_size_limit()} characters"
        raise DatasetError(f"line {lines.number}: {cap_text(problem)}", {"line": lines.number}) from exc
    lines.record_bytes = 0
    return row


def _input_columns(header: list[str], options: Options) -> dict[str, int]:
    """The option ``input_fields``: optional fields (``pre_ret``, or ``volatility=range_ratio`` to read a column
    of another name) put into each example's input by :func:`service.llm.prompts.render_input`; name -> column."""
    found: dict[str, int] = {}
    for entry in options.items("input_fields", []):
        name, _, column = str(entry).partition("=")
        name, column = name.strip(), column.strip() or name.strip()
        if name not in INPUT_FIELDS:
            raise DatasetError(
                f"option 'input_fields': unknown field {cap_repr(name)} (known: {', '.join(INPUT_FIELDS)})",
                {"option": "input_fields", "allowed": list(INPUT_FIELDS)},
            )
        found[name] = _column(header, column, (), "input_fields")
    return found


def _column(header: list[str], wanted: str | None, defaults: tuple[str, ...], option: str) -> int:
    """Index of the named column, or of the first default present; a 4xx names what is missing and what exists."""
    candidates = (wanted,) if wanted else defaults
    for name in candidates:
        if name in header:
            return header.index(name)
    missing = cap_repr(wanted) if wanted else " or ".join(repr(d) for d in defaults)
    raise DatasetError(
        f"the CSV file has no column {missing} ({len(header)} columns: {cap_join(header)}); "
        f"name the column with the option '{option}'",
        {"column": wanted or defaults[0], "option": option, "columns": header},
    )


# ------------------------------------------------------------------------------------------------------ parse
PARSERS: dict[str, Parser] = {
    "instruction_jsonl": parse_instruction_jsonl,
    "chat_jsonl": parse_chat_jsonl,
    "csv": parse_csv,
    "sqlite": parse_sqlite,
}


def parse_stream(
    stream: IO[bytes],
    format: str | None = None,
    options: dict[str, Any] | None = None,
    *,
    limits: Limits | None = None,
    write: Callable[[Example, Split], None] | None = None,
    keep: bool = False,
) -> Parsed:
    """Parse an upload read from ``stream`` (seekable), handing each distinct example to ``write`` (and keeping
    them in ``examples``/``validation`` if ``keep``); raises DatasetError when nothing usable (or no label) remains.
    """
    limits = limits or Limits()
    if is_blank(stream):
        raise DatasetError("the file is empty", {"field": "file"})
    name = format or detect_format(head(stream))
    if name not in PARSERS:
        raise DatasetError(
            f"unknown or unsupported format {cap_repr(name)}", {"field": "format", "supported": sorted(PARSERS)}
        )
    opts = Options(options)
    allow_unlabelled = opts.flag("allow_unlabelled", False)
    parsed = Parsed(format=name)
    examples = PARSERS[name](stream, opts, parsed, limits)  # reads its options (and a CSV header) at once
    opts.check_all_used(name)
    collector = Collector(parsed, limits, write, keep)
    for split, example in examples:
        collector.add(example, split)
    return _usable(collector.finish(), allow_unlabelled)


def parse(
    data: bytes | IO[bytes],
    format: str | None = None,
    options: dict[str, Any] | None = None,
    limits: Limits | None = None,
) -> Parsed:
    """:func:`parse_stream` of bytes or a file, keeping the examples in memory (for small files: tests, benches)."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    return parse_stream(stream, format, options, limits=limits, keep=True)


def _usable(parsed: Parsed, allow_unlabelled: bool) -> Parsed:
    rejected = {"rejected": parsed.rejected, "rejected_count": parsed.rejected_count}
    if not parsed.num_train:
        raise DatasetError("no usable examples in the file", {"format": parsed.format, **rejected})
    if not allow_unlabelled and set(parsed.labels) <= {None}:
        raise DatasetError(
            f"none of the {parsed.num_train + parsed.num_validation} examples states a sentiment label "
            "(利好/利空/中性, 看涨（Bullish）/看跌（Bearish）/中性（Neutral）, bullish/bearish/neutral), so the job "
            "could not be evaluated; set the option allow_unlabelled to train on it anyway",
            {"format": parsed.format, "option": "allow_unlabelled", **rejected},
        )
    return parsed
