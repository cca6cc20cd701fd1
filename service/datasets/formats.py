"""Parsing uploads into examples. Each parser returns every good example and every rejected line with why.

Formats are detected from the content unless the caller names one. A parser never executes anything it reads.
One function per format; the JSON Lines formats share the line reader, the label-carrying formats
(CSV, the SQLite database) write their outputs with :func:`service.llm.prompts.render_response`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

from service.datasets.base import DEFAULT_STAR, MAX_REJECTED_LISTED, DatasetError, Options, Parsed, star_of
from service.datasets.sqlite_import import parse_sqlite
from service.llm.prompts import (
    DEFAULT_INSTRUCTION,
    INPUT_FIELDS,
    Example,
    normalise_label,
    render_input,
    render_response,
)

__all__ = ["MAX_REJECTED_LISTED", "DatasetError", "Parsed", "detect_format", "parse"]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"the file is not UTF-8 (line {line}, byte {exc.start})", {"line": line}) from exc


def detect_format(data: bytes) -> str:
    head = data[:4096].lstrip()
    if head.startswith(b"SQLite format 3\x00"):
        return "sqlite"
    if head.startswith(b"["):
        raise DatasetError(
            "the file is a JSON array; upload JSON Lines (one object per line) instead", {"field": "file"}
        )
    if head.startswith(b"{"):
        first = head.split(b"\n", 1)[0]
        return "chat_jsonl" if b'"messages"' in first else "instruction_jsonl"
    return "csv"


# ------------------------------------------------------------------------------------------- JSON Lines formats
def _json_records(data: bytes, parsed: Parsed) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each good line; bad lines go to ``parsed.rejected`` with the reason."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            parsed.rejected.append({"line": number, "reason": f"not UTF-8 (byte {exc.start} of the line)"})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            parsed.rejected.append({"line": number, "reason": f"bad JSON: {exc.msg} at column {exc.colno}"})
            continue
        if not isinstance(record, dict):
            parsed.rejected.append({"line": number, "reason": "not a JSON object"})
            continue
        yield number, record


def parse_instruction_jsonl(data: bytes, options: Options) -> Parsed:
    """Alpaca-style lines: ``instruction``, optional ``input``, ``output``."""
    parsed = Parsed(format="instruction_jsonl")
    for number, record in _json_records(data, parsed):
        problem = _instruction_problem(record)
        if problem:
            parsed.rejected.append({"line": number, "reason": problem})
            continue
        parsed.examples.append(
            Example(
                str(record.get("instruction") or "").strip(), str(record.get("input") or ""), record["output"].strip()
            )
        )
    return parsed


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


def parse_chat_jsonl(data: bytes, options: Options) -> Parsed:
    """OpenAI fine-tuning lines ``{"messages": [...]}``: system -> instruction, user -> input, last assistant -> output.

    Without a system message the user's message becomes the instruction (the prompt then reads as the user wrote
    it). Turns before the last assistant message are kept, prefixed with who spoke, when there is more than one.
    """
    parsed = Parsed(format="chat_jsonl")
    for number, record in _json_records(data, parsed):
        example = _chat_example(record)
        if isinstance(example, str):
            parsed.rejected.append({"line": number, "reason": example})
        else:
            parsed.examples.append(example)
    return parsed


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
def parse_csv(data: bytes, options: Options) -> Parsed:
    """A text column and a label column (-1/0/1 or bearish/neutral/bullish); outputs in the standard format."""
    parsed = Parsed(format="csv")
    delimiter = options.text("delimiter", ",")
    if len(delimiter) != 1:
        raise DatasetError("option 'delimiter' must be one character", {"option": "delimiter"})
    reader = csv.reader(io.StringIO(_decode(data), newline=""), delimiter=delimiter)
    header = [name.strip() for name in next(reader, [])]
    if not any(header):
        raise DatasetError("the CSV file has no header row", {"line": 1})
    text_at = _column(header, options.text("text_column", None), ("text", "content"), "text_column")
    label_at = _column(header, options.text("label_column", None), ("label",), "label_column")
    star_name = options.text("star_column", None)
    star_at = _column(header, star_name, ("star",), "star_column") if star_name or "star" in header else None
    instruction = options.text("instruction", DEFAULT_INSTRUCTION)
    field_at = _input_columns(header, options)
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num  # a quoted field may span lines: report where the row starts
        if not any(cell.strip() for cell in row):
            continue
        text = row[text_at].strip() if text_at < len(row) else ""
        raw_label = row[label_at].strip() if label_at < len(row) else ""
        label = normalise_label(raw_label)
        if not text:
            parsed.rejected.append({"line": start, "reason": f"empty text (column '{header[text_at]}')"})
        elif label is None:
            what = "empty label" if not raw_label else f"label {raw_label!r} is not -1/0/1 or bearish/neutral/bullish"
            parsed.rejected.append({"line": start, "reason": f"{what} (column '{header[label_at]}')"})
        else:
            star = star_of(row[star_at]) if star_at is not None and star_at < len(row) else DEFAULT_STAR
            values = {name: row[at] if at < len(row) else None for name, at in field_at.items()}
            try:
                model_input = render_input(text, values)
            except ValueError as exc:
                parsed.rejected.append({"line": start, "reason": str(exc)})
                continue
            parsed.examples.append(Example(instruction, model_input, render_response(label, star)))
    parsed.extra["columns"] = {
        "text": header[text_at],
        "label": header[label_at],
        "star": header[star_at] if star_at is not None else None,
        "input_fields": {name: header[at] for name, at in field_at.items()},
    }
    return parsed


def _input_columns(header: list[str], options: Options) -> dict[str, int]:
    """The option ``input_fields``: optional fields (``pre_ret``, or ``volatility=range_ratio`` to read a column
    of another name) put into each example's input by :func:`service.llm.prompts.render_input`; name -> column."""
    found: dict[str, int] = {}
    for entry in options.items("input_fields", []):
        name, _, column = str(entry).partition("=")
        name, column = name.strip(), column.strip() or name.strip()
        if name not in INPUT_FIELDS:
            raise DatasetError(
                f"option 'input_fields': unknown field {name!r} (known: {', '.join(INPUT_FIELDS)})",
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
    missing = repr(wanted) if wanted else " or ".join(repr(d) for d in defaults)
    raise DatasetError(
        f"the CSV file has no column {missing} (columns: {', '.join(header)}); "
        f"name the column with the option '{option}'",
        {"column": wanted or defaults[0], "option": option, "columns": header},
    )


# ------------------------------------------------------------------------------------------------------ parse
PARSERS: dict[str, Callable[[bytes, Options], Parsed]] = {
    "instruction_jsonl": parse_instruction_jsonl,
    "chat_jsonl": parse_chat_jsonl,
    "csv": parse_csv,
    "sqlite": parse_sqlite,
}


def parse(data: bytes, format: str | None = None, options: dict[str, Any] | None = None) -> Parsed:
    """Parse an upload; drops exact duplicates; raises DatasetError when nothing usable (or no label) remains."""
    if not data.strip():
        raise DatasetError("the file is empty", {"field": "file"})
    name = format or detect_format(data)
    if name not in PARSERS:
        raise DatasetError(f"unknown or unsupported format {name!r}", {"field": "format", "supported": sorted(PARSERS)})
    opts = Options(options)
    allow_unlabelled = opts.flag("allow_unlabelled", False)
    parsed = PARSERS[name](data, opts)
    opts.check_all_used(name)
    parsed.examples, parsed.validation, parsed.duplicates_removed = _dedupe(parsed.examples, parsed.validation)
    rejected = {"rejected": parsed.rejected[:MAX_REJECTED_LISTED], "rejected_count": len(parsed.rejected)}
    if not parsed.examples:
        raise DatasetError("no usable examples in the file", {"format": name, **rejected})
    if not allow_unlabelled and all(e.label is None for e in parsed.examples + parsed.validation):
        raise DatasetError(
            f"none of the {len(parsed.examples) + len(parsed.validation)} examples states a sentiment label "
            "(利好/利空/中性, 看涨（Bullish）/看跌（Bearish）/中性（Neutral）, bullish/bearish/neutral), so the job "
            "could not be evaluated; set the option allow_unlabelled to train on it anyway",
            {"format": name, "option": "allow_unlabelled", **rejected},
        )
    return parsed


def _dedupe(train: list[Example], validation: list[Example]) -> tuple[list[Example], list[Example], int]:
    """Exact duplicates removed; a validation example equal to a training example is dropped (it would leak)."""
    seen: set[Example] = set()
    kept: tuple[list[Example], list[Example]] = ([], [])
    for examples, out in zip((train, validation), kept, strict=True):
        for example in examples:
            if example not in seen:
                seen.add(example)
                out.append(example)
    return kept[0], kept[1], len(train) + len(validation) - len(kept[0]) - len(kept[1])
