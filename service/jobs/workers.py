"""Who is working: each ``flashtune worker`` keeps a row of ``workers`` (``models.WorkerRecord``) fresh, and the API
reads the rows to say so when jobs sit queued and no worker is alive (``GET /readyz``, ``GET /workers``, the CLI, the
dashboard).

    worker process:  start_heartbeat(engine, worker_id, every)  a daemon thread: beat() every ``every`` seconds,
                                                                 stop() when the process exits normally
    API:             presence(session, lease_seconds)            alive workers, runnable queue, the notice

A worker counts as alive while its last heartbeat is younger than the lease (``FLASHTUNE_LEASE_SECONDS``), the age
after which its running job would be taken over too; one that stops cleanly says so at once. The heartbeat runs in
a thread of its own, so a worker busy starting its job processes or supervising a long job is still seen.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import Engine, delete, update
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from service.jobs import jobstore
from service.jobs.db import session_scope
from service.jobs.models import Job, JobStatus, WorkerRecord, utcnow

log = logging.getLogger("flashtune.worker")
FORGET_AFTER = timedelta(days=7)  # rows of workers gone this long are deleted when a worker starts
START_HINT = "start one with `flashtune worker` (same FLASHTUNE_DATA_DIR and FLASHTUNE_DATABASE_URL as the API)"


def _aware(moment: datetime) -> datetime:
    # SQLite hands datetimes back without a zone; everything FlashTune writes is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------------------------ writes
def beat(session: Session, worker_id: str, now: datetime | None = None) -> None:
    """Record that this worker process is alive (its row is made on the first beat)."""
    now = now or utcnow()
    seen = update(WorkerRecord).where(col(WorkerRecord.id) == worker_id).values(last_seen_at=now, stopped_at=None)
    if session.execute(seen).rowcount == 0:  # type: ignore[attr-defined]
        session.add(
            WorkerRecord(id=worker_id, hostname=socket.gethostname(), pid=os.getpid(), started_at=now, last_seen_at=now)
        )


def stop(session: Session, worker_id: str, now: datetime | None = None) -> None:
    """Mark the worker stopped (a clean exit): it no longer counts as alive."""
    session.execute(update(WorkerRecord).where(col(WorkerRecord.id) == worker_id).values(stopped_at=now or utcnow()))


def forget_old(session: Session, now: datetime | None = None) -> int:
    """Delete the rows of workers not seen for ``FORGET_AFTER``; returns how many."""
    cutoff = (now or utcnow()) - FORGET_AFTER
    result = session.execute(delete(WorkerRecord).where(col(WorkerRecord.last_seen_at) < cutoff))
    return int(result.rowcount)  # type: ignore[attr-defined]


class Heartbeat(threading.Thread):
    """Beats for one worker every ``every`` seconds until ``finish()`` (registered to run at exit)."""

    def __init__(self, engine: Engine, worker_id: str, every: float) -> None:
        super().__init__(name=f"flashtune-heartbeat-{worker_id}", daemon=True)
        self.engine, self.worker_id, self.every = engine, worker_id, every
        self.done = threading.Event()
        self.failing = False

    def run(self) -> None:
        while not self.done.is_set():
            self._write(beat)
            self.done.wait(self.every)

    def _write(self, what: Callable[[Session, str], object]) -> None:
        try:
            with session_scope(self.engine) as session:
                what(session, self.worker_id)
            self.failing = False
        except DBAPIError as exc:  # the next beat retries; jobs' own heartbeats keep their leases meanwhile
            if not self.failing:
                log.warning("worker %s: presence heartbeat failed (retrying): %s", self.worker_id, exc)
            self.failing = True

    def finish(self) -> None:
        self.done.set()
        self.join(self.every + 5)
        self._write(stop)


def start_heartbeat(engine: Engine, worker_id: str, every: float) -> Heartbeat:
    """Record this worker now and every ``every`` seconds from a daemon thread; mark it stopped at exit."""
    try:
        with session_scope(engine) as session:
            forget_old(session)
    except DBAPIError as exc:
        log.warning("could not clean up old worker rows: %s", exc)
    heartbeat = Heartbeat(engine, worker_id, every)
    heartbeat.start()
    atexit.register(heartbeat.finish)
    return heartbeat


# ------------------------------------------------------------------------------------------------------- reads
class WorkerState(BaseModel):
    """One worker as ``GET /workers`` shows it."""

    id: str
    hostname: str
    pid: int
    state: Literal["alive", "stopped", "lost"] = Field(
        description="alive: heartbeat younger than the lease; stopped: exited cleanly; lost: silent for a lease"
    )
    started_at: datetime
    last_seen_at: datetime
    last_seen_seconds: float = Field(description="seconds since its last heartbeat")
    stopped_at: datetime | None
    job_id: int | None = Field(default=None, description="the job it is running")


class Presence(BaseModel):
    """Whether anyone will take the queued jobs (``GET /readyz``'s ``workers``)."""

    alive: int = Field(description="workers whose heartbeat is younger than the lease")
    last_seen_seconds: float | None = Field(description="seconds since any worker's last heartbeat; null: never")
    runnable_jobs: int = Field(description="queued jobs a free worker would claim now")
    oldest_wait_seconds: float = Field(description="how long the oldest of them has waited")
    notice: str | None = Field(description="set when jobs wait and no worker is alive: what is wrong and what to do")


def _state(row: WorkerRecord, now: datetime, lease_seconds: float) -> Literal["alive", "stopped", "lost"]:
    if row.stopped_at is not None:
        return "stopped"
    return "alive" if (now - _aware(row.last_seen_at)).total_seconds() < lease_seconds else "lost"


def list_workers(session: Session, lease_seconds: float, now: datetime | None = None) -> list[WorkerState]:
    """Every worker seen in the last ``FORGET_AFTER``, most recently seen first, with the job it runs."""
    now = now or utcnow()
    rows = session.exec(select(WorkerRecord).order_by(col(WorkerRecord.last_seen_at).desc()).limit(200)).all()
    running = dict(
        session.exec(select(Job.worker_id, Job.id).where(col(Job.status) == JobStatus.running)).all()  # type: ignore[arg-type]
    )
    return [
        WorkerState(
            id=row.id,
            hostname=row.hostname,
            pid=row.pid,
            state=_state(row, now, lease_seconds),
            started_at=_aware(row.started_at),
            last_seen_at=_aware(row.last_seen_at),
            last_seen_seconds=round(max(0.0, (now - _aware(row.last_seen_at)).total_seconds()), 1),
            stopped_at=_aware(row.stopped_at) if row.stopped_at else None,
            job_id=running.get(row.id),
        )
        for row in rows
    ]


def presence(session: Session, lease_seconds: float, now: datetime | None = None) -> Presence:
    now = now or utcnow()
    workers = list_workers(session, lease_seconds, now)
    alive = sum(1 for w in workers if w.state == "alive")
    last_seen = min((w.last_seen_seconds for w in workers), default=None)
    runnable, oldest = jobstore.runnable_queue(session, now)
    wait = round(max(0.0, (now - _aware(oldest)).total_seconds()), 1) if oldest is not None else 0.0
    return Presence(
        alive=alive,
        last_seen_seconds=last_seen,
        runnable_jobs=runnable,
        oldest_wait_seconds=wait,
        notice=notice(alive, last_seen, runnable, wait),
    )


def notice(alive: int, last_seen_seconds: float | None, runnable: int, wait_seconds: float) -> str | None:
    """The line to show when jobs wait and no worker is alive ("no worker has been seen for N s ..."); else None."""
    if alive or not runnable:
        return None
    seen = (
        "no worker has been seen by this database"
        if last_seen_seconds is None
        else f"no worker has been seen for {last_seen_seconds:.0f} s"
    )
    jobs = "1 job waits" if runnable == 1 else f"{runnable} jobs wait"
    return f"{seen}; {jobs} (the oldest for {wait_seconds:.0f} s): {START_HINT}"
