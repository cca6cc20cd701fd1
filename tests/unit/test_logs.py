"""Structured logs: the JSON formatter writes one object per record with the request and job ids of its context
(the real serve and worker processes' logs are checked in tests/integration/test_logs.py)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from service.core import logs


def test_json_formatter_one_line_per_record_with_context_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("flashtune.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        token = logs.request_id_var.set("req-1")
        with logs.bind_job(7):
            logger.warning("multi\nline %s", "message", extra={"attempt": 2, "path": Path("/x")})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logs.request_id_var.reset(token)
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "multi\nline message" and first["level"] == "WARNING"
    assert first["request_id"] == "req-1" and first["job_id"] == 7 and first["attempt"] == 2
    assert first["path"] == "PosixPath('/x')" and first["logger"] == "flashtune.test-json"
    assert second["message"] == "failed" and "ValueError: boom" in second["exc_info"] and second["job_id"] == 7
    assert "request_id" not in third and "job_id" not in third
