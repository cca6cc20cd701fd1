"""The one error a use case raises when it refuses a request.

Use cases (service/jobs/commands.py, the serving engine, the dataset store's callers) raise ``RequestError``; the
API turns it into the service's one error body ``{"error": {"type", "message", "details"?}}`` with its status
(service/api/errors.py). It lives here, below both, so neither the job domain nor serving imports the HTTP layer.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """``status``: the HTTP status it answers; ``type``: a stable machine-readable kind; ``details``: per field."""

    def __init__(self, status: int, type: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.details = status, type, message, details


def not_found(what: str, ident: object) -> RequestError:
    return RequestError(404, "not_found", f"{what} {ident!s} does not exist")
