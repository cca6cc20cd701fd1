"""The published OpenAPI schema says what the code checks, and how operations lead to one another.

* Limits that are settings (``FLASHTUNE_MAX_TEXT_CHARS``, ``FLASHTUNE_MAX_NEW_TOKENS_LIMIT``,
  ``FLASHTUNE_MAX_BATCH_ITEMS``) are written into the request shapes when the schema is first built, so a request
  the schema allows is one the server accepts, and one it forbids is refused (422).
* Links: the id a ``POST`` (or a list) returns is the path parameter of the operations on that object, so clients
  and stateful fuzzers (schemathesis' ``stateful`` phase) can follow them.
* With an API key configured, every operation but ``/healthz`` and ``/readyz`` declares the bearer scheme.

A limit or link whose target is gone from the schema (a renamed shape or route) is logged and skipped:
``tests/integration/test_hostile.py`` checks that each one is published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from service.core.config import Settings

log = logging.getLogger("flashtune.api")
Schema = dict[str, Any]

_KEYWORD_TYPES = {
    "maxLength": "string",
    "minLength": "string",
    "pattern": "string",
    "maximum": "integer",
    "maxItems": "array",
}


# A text with a character ``str.strip`` keeps: the server strips texts and refuses what is left empty. The set is
# spelled out because a pattern's \\s means ECMA's whitespace, which is another set (U+FEFF in, U+001C-U+001F out).
NOT_BLANK = "[^" + "".join(f"\\u{ord(c):04x}" for c in map(chr, range(0x3001)) if c.isspace()) + "]"


def limits(settings: Settings) -> list[tuple[str, tuple[str, ...], Schema]]:
    """(component, property path, JSON Schema keywords) of each limit that is a setting. A path step ``items`` goes
    into an array's item schema."""
    text = {"maxLength": settings.max_text_chars, "minLength": 1, "pattern": NOT_BLANK}
    tokens = {"maximum": settings.max_new_tokens_limit}
    return [
        ("AnalyzeItem", ("text",), text),
        ("AnalyzeRequest", ("text",), text),
        ("AnalyzeRequest", ("max_new_tokens",), tokens),
        ("AnalyzeBatchRequest", ("max_new_tokens",), tokens),
        ("AnalyzeBatchRequest", ("items",), {"maxItems": settings.max_batch_items}),
        ("AnalyzeBatchRequest", ("items", "items"), text),
    ]


def _constrain(node: Schema, keywords: Schema) -> bool:
    """Put each keyword on the branches of ``node`` (itself, or its ``anyOf``) of the type it applies to."""
    branches = node.get("anyOf", [node])
    done = False
    for branch in branches:
        for keyword, value in keywords.items():
            if branch.get("type") == _KEYWORD_TYPES[keyword] or (
                _KEYWORD_TYPES[keyword] == "integer" and branch.get("type") == "number"
            ):
                branch[keyword] = value
                done = True
    return done


def _property(schema: Schema, component: str, path: tuple[str, ...]) -> Schema | None:
    node: Schema | None = schema.get("components", {}).get("schemas", {}).get(component)
    for step in path:
        if node is None:
            return None
        node = node.get("items") if step == "items" and "items" in node else node.get("properties", {}).get(step)
    return node


# Links: (operation that returns the id, its status, where in its body, link name, target operation, parameter).
LINKS = [
    ("POST /jobs", "201", "$response.body#/id", "GET /jobs/{job_id}", "job_id"),
    ("POST /jobs", "201", "$response.body#/id", "GET /jobs/{job_id}/events", "job_id"),
    ("POST /jobs", "201", "$response.body#/id", "GET /jobs/{job_id}/metrics", "job_id"),
    ("POST /jobs", "201", "$response.body#/id", "POST /jobs/{job_id}/cancel", "job_id"),
    ("POST /datasets", "201", "$response.body#/id", "GET /datasets/{dataset_id}", "dataset_id"),
    ("POST /v1/files", "200", "$response.body#/id", "GET /v1/files/{file_id}", "file_id"),
    ("POST /v1/fine_tuning/jobs", "200", "$response.body#/id", "GET /v1/fine_tuning/jobs/{job_id}", "job_id"),
    ("POST /v1/fine_tuning/jobs", "200", "$response.body#/id", "GET /v1/fine_tuning/jobs/{job_id}/events", "job_id"),
    (
        "POST /v1/fine_tuning/jobs",
        "200",
        "$response.body#/id",
        "GET /v1/fine_tuning/jobs/{job_id}/checkpoints",
        "job_id",
    ),
    ("POST /v1/fine_tuning/jobs", "200", "$response.body#/id", "POST /v1/fine_tuning/jobs/{job_id}/cancel", "job_id"),
    ("GET /adapters", "200", "$response.body#/0/name", "GET /adapters/{name}", "name"),
    ("GET /adapters", "200", "$response.body#/0/name", "GET /adapters/{name}/download", "name"),
]


def _operation(schema: Schema, label: str) -> Schema | None:
    method, _, path = label.partition(" ")
    operation: Schema | None = schema.get("paths", {}).get(path, {}).get(method.lower())
    return operation


def add_links(schema: Schema) -> list[str]:
    """Add ``LINKS`` to the schema; returns those whose source or target operation is missing."""
    missing = []
    for source, status, value, target, parameter in LINKS:
        operation, target_operation = _operation(schema, source), _operation(schema, target)
        response = (operation or {}).get("responses", {}).get(status)
        if response is None or target_operation is None or "operationId" not in target_operation:
            missing.append(f"{source} -> {target}")
            continue
        name = target_operation["operationId"]
        response.setdefault("links", {})[name] = {"operationId": name, "parameters": {parameter: value}}
    return missing


def add_limits(schema: Schema, settings: Settings) -> list[str]:
    """Write the setting limits into the schema; returns those whose property is missing."""
    missing = []
    for component, path, keywords in limits(settings):
        node = _property(schema, component, path)
        if node is None or not _constrain(node, keywords):
            missing.append(f"{component}.{'.'.join(path)}")
    return missing


PUBLIC_PATHS = ("/healthz", "/readyz")  # answered without a key (service/api/main.py)


def add_security(schema: Schema) -> None:
    """Say that every operation but the public ones needs ``Authorization: Bearer <key>`` (with a key configured):
    clients generate the header, and a fuzzer checks that a request without it is refused."""
    schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    refused = {
        "description": "Missing or wrong API key",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["security"] = [] if path in PUBLIC_PATHS else [{"apiKey": []}]
                if path not in PUBLIC_PATHS:  # a route outside the protected routers documents its 401 too
                    operation["responses"].setdefault("401", refused)


def install(app: FastAPI, settings: Settings) -> None:
    """Build ``app``'s schema once, with the limits, the links and (with a key configured) the security added."""
    build: Callable[[], Schema] = app.openapi

    def openapi() -> Schema:
        if app.openapi_schema is None:
            schema = build()
            if settings.auth_enabled:
                add_security(schema)
            missing = add_limits(schema, settings) + add_links(schema)
            if missing:
                log.warning("OpenAPI schema: not found, not published: %s", ", ".join(missing))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
