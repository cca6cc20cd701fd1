"""Client commands of ``flashtune``: talk to a running API by URL and key (typer + rich).

    flashtune jobs submit|list|show|watch|events|cancel     flashtune datasets upload|list|show
    flashtune adapters list|show|download|alias|aliases|promote   flashtune workers   flashtune analyze "text"

Tables for people, ``--json`` for scripts. ``jobs watch`` (and ``jobs submit --watch``) follows a job until it
ends: a live progress bar on a terminal, plain lines otherwise (a log file, CI), with the wait for a worker and
the model build shown as phases. Exit codes: 0 done; 1 the API refused, the server is unreachable, or the watched
job failed or was cancelled (its error and hint printed); 2 a bad option, JSON value or file (usage error); 130
interrupted. Errors are one line on stderr, never a traceback. The server comes from ``--url`` /
``FLASHTUNE_URL``, the key from ``--api-key`` / ``FLASHTUNE_API_KEY``.

One module a command group (``jobs``, ``datasets``, ``adapters``, ``workers``, ``analyze``), over shared parts:
``options`` (the common options, JSON option values), ``output`` (stdout/stderr, tables, cells), ``http`` (the API
client, its errors as lines) and ``follow`` (watching a job).
"""

from __future__ import annotations

import typer

from service.cli_client.adapters import adapters_app
from service.cli_client.analyze import analyze
from service.cli_client.datasets import datasets_app
from service.cli_client.jobs import jobs_app
from service.cli_client.workers import workers


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``flashtune`` app."""
    app.add_typer(jobs_app, name="jobs", no_args_is_help=True)
    app.add_typer(datasets_app, name="datasets", no_args_is_help=True)
    app.add_typer(adapters_app, name="adapters", no_args_is_help=True)
    app.command("workers")(workers)
    app.command("analyze")(analyze)
