"""The options every client command shares (``--url``, ``--api-key``, ``--json``) and the parsing of option values
(JSON objects, ``@file``): a bad value is a usage error naming its option (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

DEFAULT_URL = "http://127.0.0.1:8000"

Url = Annotated[str, typer.Option("--url", envvar="FLASHTUNE_URL", help="The FlashTune API.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="FLASHTUNE_API_KEY", help="Bearer key.", show_default=False)
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output (the API's own JSON).")]


def bad_option(option: str, message: str) -> NoReturn:
    """A usage error naming the option (click prints it with the usage line; exit 2)."""
    raise typer.BadParameter(message, param_hint=f"'{option}'")


def json_object(value: str | None, option: str) -> dict[str, Any] | None:
    """The JSON object an option holds (``@file`` reads it from a file); a usage error naming the option if not."""
    if value is None:
        return None
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            bad_option(option, f"cannot read {value[1:]}: {exc.strerror}")
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        bad_option(option, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
    if not isinstance(data, dict):
        bad_option(option, "must be a JSON object, e.g. '{\"epochs\": 2}'")
    return data
