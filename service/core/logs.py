"""Logging for ``flashtune serve`` and ``flashtune worker``: plain text, or one JSON object per line.

With ``FLASHTUNE_LOG_JSON=true`` (or ``--log-json``) every record, uvicorn's included, is written to stderr as

    {"timestamp": "2026-12-01T10:00:00.123Z", "level": "INFO", "logger": "flashtune.worker",
     "message": "running job 7 (attempt 1)", "job_id": 7}

with ``request_id`` while the API handles a request (the ``X-Request-ID`` the client sent, or the one the
security middleware made up; it is echoed in the response header), ``job_id`` while a worker or its training
child runs a job, ``exc_info`` for exceptions, and ``method``/``path``/``status`` on uvicorn's access lines.
Both ids travel in context variables, so code that logs needs no change: the security middleware sets
``request_id_var`` for each request, ``bind_job`` sets the job id in the worker and the training child.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("flashtune_request_id", default=None)
job_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("flashtune_job_id", default=None)

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every record has; anything else came through ``extra=`` and is written too (uvicorn's
# ``color_message``, the message with terminal colours, is left out).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


class ContextFilter(logging.Filter):
    """Copy the request and job ids of the current context onto each record (unless set through ``extra``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside the message are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "timestamp": created.strftime("%Y-%m-%dT%H:%M:%S.") + f"{created.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            _client, method, path, _version, status = record.args
            entry.update(method=method, path=path, status=status)
        for key, value in vars(record).items():  # anything passed through ``extra=``
            if key not in _RECORD_ATTRS and key not in entry and key not in ("request_id", "job_id"):
                entry[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(json_lines: bool, level: int = logging.INFO) -> None:
    """Replace the root logger's handlers with one stderr handler, plain or JSON.

    In JSON mode, uvicorn's own loggers and Python warnings are routed to the root logger too, so that every
    line on stderr is JSON (pass ``log_config=None`` to ``uvicorn.run`` so it keeps this set-up).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if json_lines:
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
        logging.captureWarnings(True)
        # Progress bars (transformers' "Writing model shards", hub downloads) are written straight to stderr, not
        # logged: turn them off, here and in the processes started from here (the training child inherits this);
        # transformers' own records go through the root logger instead of its own handler.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:  # already imported: the variable was read at import
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        from transformers.utils import logging as transformers_logging  # it has a stderr handler of its own

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def bind_job(job_id: int | None) -> Iterator[None]:
    """Records logged inside carry ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)
