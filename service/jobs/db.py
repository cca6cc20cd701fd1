"""Engine and schema: SQLite (WAL, busy timeout, immediate transactions) or PostgreSQL.

SQLite: every transaction that may write starts with ``BEGIN IMMEDIATE`` so two writers never both read and then
fail to upgrade their lock (``database is locked``); they queue on the busy timeout instead. Sessions that only
read (``session_scope(engine, read_only=True)``: the API's GETs and adapter lookups, the loading of a job's
dataset) begin DEFERRED, so in WAL mode they never wait for a writer, not even one stopped while holding the
write lock, and hold no lock themselves. The service refuses an SQLite file that cannot be put in WAL mode
(network file systems, read-only media), because readers would then block the worker's progress writes.

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

from service.jobs import models  # noqa: F401  (registers the tables)

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_IDLE_IN_TRANSACTION_MS = 300_000  # far above any transaction of ours, which last milliseconds
READ_ONLY = "flashtune_read_only"  # execution option of the engine behind read-only sessions


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
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_setup(engine)
    else:
        # Timestamps are stored without a time zone, in UTC: pin the session's zone so the server's default
        # cannot shift them. A client stopped inside a transaction (a paused VM) would hold its row locks, and
        # so block the other workers' sweep of its job, until it resumed: the server ends such a session after
        # PG_IDLE_IN_TRANSACTION_MS (the stopped worker's next write then finds its lease gone).
        options = f"-c timezone=UTC -c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_MS}"
        connect_args = {"options": options} if url.startswith("postgresql") else {}
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)
    return engine


# ----------------------------------------------------------------------------------------------------- schema
def _v1(conn: Connection) -> None:
    SQLModel.metadata.create_all(conn)


def _v2(conn: Connection) -> None:
    """The tables added since v1 (aliases, promotions): create_all creates only the missing ones."""
    SQLModel.metadata.create_all(conn)


def _v3(conn: Connection) -> None:
    """The workers table (service/jobs/workers.py: each worker's heartbeat row)."""
    SQLModel.metadata.create_all(conn)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3]  # index i upgrades version i to i + 1
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


def _refuse_writes(_session: Session, _context: Any, _instances: Any) -> None:
    raise DatabaseError("a read-only session was asked to write; use session_scope(engine) for writes")


@contextmanager
def session_scope(engine: Engine, read_only: bool = False) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error. ``read_only``: a transaction
    that never waits for SQLite's write lock (see the module's docstring) and refuses to flush changes."""
    if read_only:
        engine = engine.execution_options(**{READ_ONLY: True})
    with Session(engine, expire_on_commit=False) as session:
        if read_only:
            event.listen(session, "before_flush", _refuse_writes)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
