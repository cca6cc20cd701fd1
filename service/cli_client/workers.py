"""``flashtune workers``: the workers this database has seen, and a warning when jobs wait with none alive."""

from __future__ import annotations

from typing import Any

from service.cli_client.http import Api
from service.cli_client.options import DEFAULT_URL, ApiKey, AsJson, Url
from service.cli_client.output import Columns, duration, print_rows, say

WORKER_COLUMNS: Columns = [
    ("id", "ID"),
    ("hostname", "HOST"),
    ("pid", "PID"),
    ("state", "STATE"),
    ("job_id", "JOB"),
    ("seen", "LAST SEEN"),
    ("started_at", "STARTED"),
]


def worker_row(worker: dict[str, Any]) -> dict[str, Any]:
    return {**worker, "seen": f"{duration(worker['last_seen_seconds'])} ago"}


def workers(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the workers. Alive, stopped or lost, and the job each runs."""
    with Api(url, api_key) as api:
        rows = api.get("/workers")
        text = api.worker_notice()
    print_rows(rows, WORKER_COLUMNS, as_json, row=worker_row)
    if as_json:
        return
    if text:
        say(f"warning: {text}")
    elif not rows:
        say("no worker has been seen by this database: start one with `flashtune worker`")
