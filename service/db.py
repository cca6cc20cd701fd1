"""Engine and schema: SQLite (WAL, busy timeout, immediate transactions) or PostgreSQL.

SQLite: every transaction starts with ``BEGIN IMMEDIATE`` so two writers never both read and then fail to
upgrade their lock (``database is locked``); they queue on the busy timeout instead. The service refuses an
SQLite file that cannot be put in WAL mode (network file systems, read-only media), because readers would
then block the worker's progress writes.

The schema carries a version number; ``MIGRATIONS`` upgrades an older database in order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.engine import Connection
from sqlmodel import Session, SQLModel, create_engine

from service import models  # noqa: F401  (registers the tables)

SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseError(Exception):
    pass


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event below issues BEGIN itself
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        try:
            mode = str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.Error as exc:  # e.g. "attempt to write a readonly database"
            mode = f"error: {exc}"
        if mode.lower() != "wal":
            raise DatabaseError(
                f"SQLite could not switch to WAL mode (got {mode!r}); without WAL, readers block the worker's "
                "progress writes. Put FLASHTUNE_DATA_DIR on a local, writable disk or use PostgreSQL through "
                "FLASHTUNE_DATABASE_URL"
            )
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_setup(engine)
    else:
        # Timestamps are stored without a time zone, in UTC: pin the session's zone so the server's default
        # cannot shift them.
        connect_args = {"options": "-c timezone=UTC"} if url.startswith("postgresql") else {}
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)
    return engine


# ----------------------------------------------------------------------------------------------------- schema
def _v1(conn: Connection) -> None:
    SQLModel.metadata.create_all(conn)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1]  # index i upgrades version i to i + 1
SCHEMA_VERSION = len(MIGRATIONS)


def init_db(engine: Engine) -> int:
    """Create or upgrade the schema; returns the version. Safe to call from several processes at once."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7461290)"))  # one migrator at a time
        conn.execute(text("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"))
        row = conn.execute(text("SELECT version FROM schema_version")).first()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"database schema v{version} is newer than this FlashTune (v{SCHEMA_VERSION})")
        for migrate in MIGRATIONS[version:]:
            migrate(conn)
        if row is None:
            conn.execute(text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": SCHEMA_VERSION})
        else:
            conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION})
    return SCHEMA_VERSION


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
