"""Throw-away PostgreSQL databases for tests: ``CREATE DATABASE ft_<random>`` on the CI server, dropped afterwards.

The server is ``FLASHTUNE_TEST_POSTGRES`` (default 127.0.0.1:5432, user postgres, trust auth). Tests that use it
never skip: CI runs PostgreSQL, and a missing server is a failure to fix, not a test to hide.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_ADMIN_URL


def _conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def postgres_database() -> Iterator[str]:
    """Yield the SQLAlchemy URL of a fresh, empty database; drop it (and its connections) on exit."""
    name = f"ft_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_conninfo(POSTGRES_ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_conninfo(POSTGRES_ADMIN_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
