"""What the client commands print: one-line errors and notes on stderr, the result on stdout as JSON (``--json``),
a table, or name-value lines; cells as a person reads them (no Python reprs, local times, durations)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

Columns = list[tuple[str, str]]  # (key in a row, header)
T = TypeVar("T")


def console(stderr: bool = False) -> Console:
    """A console on stdout or stderr: colours and live bars on a terminal; elsewhere plain text, never wrapped."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 1000, highlight=False, soft_wrap=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line (or a few) on stderr and the exit code: no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def say(message: str) -> None:
    """A line for the person on stderr (stdout stays the command's result)."""
    typer.echo(message, err=True)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d")


def when(value: str) -> str:
    """An API timestamp (UTC, with or without a zone) in local time."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def cell(value: Any) -> str:
    """A value as a person reads it in a table: no Python reprs (None, dicts, lists, ISO timestamps)."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, str) and ISO_TIME.match(value):
        return when(value)
    return str(value)


def print_result(data: T, as_json: bool, render: Callable[[T], None]) -> None:
    """A command's result on stdout: the API's own JSON with ``--json``, else as ``render`` draws it for a person."""
    if as_json:
        print_json(data)
    else:
        render(data)


def print_rows(
    rows: list[dict[str, Any]],
    columns: Columns,
    as_json: bool,
    row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """A listing on stdout: the API's own JSON with ``--json``, else a table of ``columns``, each row first through
    ``row`` where given (which adds the columns a person reads, e.g. "3/10" from a job's progress)."""
    print_result(rows, as_json, lambda rows: table([row(r) for r in rows] if row else rows, columns))


def table(rows: list[dict[str, Any]], columns: Columns) -> None:
    """Rows as a table on stdout; ``columns`` are (key, header)."""
    grid = Table(box=None, header_style="bold", pad_edge=False)
    for _, header in columns:
        grid.add_column(header)
    for row in rows:
        grid.add_row(*(Text(cell(row.get(key))) for key, _ in columns))
    show(grid)


def pairs(items: list[tuple[str, Any]]) -> None:
    """Name-value lines on stdout (``show`` commands)."""
    grid = Table(box=None, show_header=False, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in items:
        grid.add_row(Text(name), Text(cell(value)))
    show(grid)


def show(renderable: Table) -> None:
    """Print on stdout: as rich draws it on a terminal; elsewhere without the padding after each line's end."""
    out = console()
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))
