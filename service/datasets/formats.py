"""Parsing uploads into examples. Each parser returns every good example and every rejected line with why.

Formats are detected from the content unless the caller names one. A parser never executes anything it reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service.prompts import Example


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


MAX_REJECTED_LISTED = 100


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
    if head.startswith(b"{"):
        first = head.split(b"\n", 1)[0]
        return "chat_jsonl" if b'"messages"' in first else "instruction_jsonl"
    return "csv"


def parse_instruction_jsonl(data: bytes) -> Parsed:
    parsed = Parsed(format="instruction_jsonl")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            parsed.rejected.append({"line": number, "reason": "not UTF-8"})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            parsed.rejected.append({"line": number, "reason": f"bad JSON: {exc.msg} at column {exc.colno}"})
            continue
        if not isinstance(record, dict):
            parsed.rejected.append({"line": number, "reason": "not a JSON object"})
            continue
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
    if not record["output"].strip():
        return "empty output"
    if not (record["instruction"] or "").strip() and not (record.get("input") or "").strip():
        return "empty instruction and input"
    return None


PARSERS = {"instruction_jsonl": parse_instruction_jsonl}


def parse(data: bytes, format: str | None = None, options: dict[str, Any] | None = None) -> Parsed:
    """Parse an upload; drops exact duplicates; raises DatasetError when nothing usable remains."""
    if not data.strip():
        raise DatasetError("the file is empty", {"field": "file"})
    name = format or detect_format(data)
    if name not in PARSERS:
        raise DatasetError(f"unknown or unsupported format {name!r}", {"field": "format", "supported": sorted(PARSERS)})
    parser = PARSERS[name]
    parsed = parser(data, **(options or {})) if options else parser(data)
    parsed.examples, parsed.duplicates_removed = _dedupe(parsed.examples)
    if not parsed.examples:
        raise DatasetError(
            "no usable examples in the file",
            {"format": name, "rejected": parsed.rejected[:MAX_REJECTED_LISTED], "rejected_count": len(parsed.rejected)},
        )
    return parsed


def _dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    seen: set[Example] = set()
    unique = []
    for example in examples:
        if example not in seen:
            seen.add(example)
            unique.append(example)
    return unique, len(examples) - len(unique)
