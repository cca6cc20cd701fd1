"""The job state machine: every status transition, each a guarded UPDATE that fails loudly when no row matches.

    queued --claim--> running --succeed--> succeeded
                        |  \\--fail------> failed
                        |   \\--retry-----> queued (run_after = now + backoff)
       (lease expired) --sweep-----------> queued, or failed after max_attempts
    queued|running --cancel-------------> cancelled

Writes made on behalf of a running job are guarded by job id, worker id, status and (where the caller names it) the
attempt number, the fencing token ``claim_next`` hands out: a worker that lost its lease (it stalled, another
worker took the job over) or a leftover process of an earlier attempt changes nothing: it gets ``LeaseLost``.
Only ``heartbeat`` (the supervising worker's) extends the lease; a training process's progress and events do not.
``hold`` locks the row while an attempt writes outside the database (a checkpoint, the adapter): no requeue,
claim or cancel can commit in between.
The claim uses ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite the immediate transaction (service.jobs.db)
serialises claimers.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, update
from sqlmodel import Session, col, select

from service.jobs.models import Job, JobEvent, JobStatus, utcnow


class TransitionError(Exception):
    """A transition whose guard matched no row: the job is not in a state that allows it."""


class LeaseLost(TransitionError):
    """The worker no longer holds the job (cancelled, or requeued after its lease expired)."""


def _held_by(job_id: int, worker_id: str, attempt: int | None = None) -> ColumnElement[bool]:
    held = and_(col(Job.id) == job_id, col(Job.worker_id) == worker_id, col(Job.status) == JobStatus.running)
    return held if attempt is None else and_(held, col(Job.attempts) == attempt)


def _guarded(session: Session, where: ColumnElement[bool], values: dict[str, Any], error: TransitionError) -> None:
    result = session.execute(update(Job).where(where).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise error


def add_event(
    session: Session, job_id: int, type: str, message: str, data: dict[str, Any] | None = None, level: str = "info"
) -> None:
    session.add(JobEvent(job_id=job_id, type=type, message=message, data=data or {}, level=level))


# ------------------------------------------------------------------------------------------------ transitions
def create(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    assert job.id is not None
    add_event(session, job.id, "queued", "job queued", {"dataset": job.dataset, "base_model": job.base_model})
    return job


def claim_next(session: Session, worker_id: str, now: datetime | None = None) -> Job | None:
    """Atomically move the oldest runnable queued job to running for this worker; None when there is none."""
    now = now or utcnow()
    oldest = (
        select(Job.id)
        .where(col(Job.status) == JobStatus.queued, col(Job.run_after) <= now)
        .order_by(col(Job.id))
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(Job)
        .where(col(Job.id) == oldest, col(Job.status) == JobStatus.queued)
        .values(
            status=JobStatus.running,
            worker_id=worker_id,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),  # type: ignore[arg-type]
            attempts=Job.attempts + 1,
        )
        .returning(col(Job.id))
    )
    job_id = session.execute(stmt).scalar_one_or_none()
    if job_id is None:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    add_event(
        session,
        job_id,
        "started",
        f"attempt {job.attempts} started on worker {worker_id}",
        {"worker_id": worker_id, "attempt": job.attempts},
    )
    return job


def heartbeat(session: Session, job_id: int, worker_id: str, attempt: int | None = None) -> None:
    """Extend the lease: called by the supervising worker alone (a training process must not keep a job whose
    worker died alive)."""
    _guarded(session, _held_by(job_id, worker_id, attempt), {"heartbeat_at": utcnow()}, LeaseLost(f"job {job_id}"))


def hold(session: Session, job_id: int, worker_id: str, attempt: int | None = None) -> None:
    """Check that ``worker_id`` (in ``attempt``) still holds the job, and keep the row locked until the session ends
    (PostgreSQL: ``FOR UPDATE``; SQLite: the write lock of the immediate transaction): a write made before the
    session ends, in the database or in ``DATA_DIR``, cannot race a requeue, a claim or a cancel. The lease is not
    extended. Raises ``LeaseLost``."""
    held = session.execute(select(Job.id).where(_held_by(job_id, worker_id, attempt)).with_for_update()).first()
    if held is None:
        raise LeaseLost(f"job {job_id}")


def update_progress(
    session: Session, job_id: int, worker_id: str, progress: dict[str, Any], attempt: int | None = None
) -> None:
    """The running attempt's progress (not a heartbeat: only the supervising worker extends the lease)."""
    _guarded(session, _held_by(job_id, worker_id, attempt), {"progress": progress}, LeaseLost(f"job {job_id}"))


def update_hyperparameters(
    session: Session, job_id: int, worker_id: str, hyperparameters: dict[str, Any], attempt: int | None = None
) -> None:
    held = _held_by(job_id, worker_id, attempt)
    _guarded(session, held, {"hyperparameters": hyperparameters}, LeaseLost(f"job {job_id}"))


def succeed(
    session: Session, job_id: int, worker_id: str, adapter: str, progress: dict[str, Any], attempt: int | None = None
) -> None:
    _guarded(
        session,
        _held_by(job_id, worker_id, attempt),
        {
            "status": JobStatus.succeeded,
            "adapter": adapter,
            "finished_at": utcnow(),
            "error": None,
            "progress": progress,
            "worker_id": None,
        },
        LeaseLost(f"job {job_id}"),
    )
    add_event(session, job_id, "succeeded", f"job succeeded; adapter {adapter} is being served", {"adapter": adapter})


def fail(session: Session, job_id: int, worker_id: str, error: dict[str, Any], attempt: int | None = None) -> None:
    _guarded(
        session,
        _held_by(job_id, worker_id, attempt),
        {"status": JobStatus.failed, "error": error, "finished_at": utcnow(), "worker_id": None},
        LeaseLost(f"job {job_id}"),
    )
    add_event(session, job_id, "failed", f"job failed: {error['message']}", error, level="error")


def retry(
    session: Session,
    job_id: int,
    worker_id: str,
    error: dict[str, Any],
    delay_seconds: float,
    attempt: int | None = None,
) -> None:
    _guarded(
        session,
        _held_by(job_id, worker_id, attempt),
        {
            "status": JobStatus.queued,
            "error": error,
            "worker_id": None,
            "heartbeat_at": None,
            "run_after": utcnow() + timedelta(seconds=delay_seconds),
        },
        LeaseLost(f"job {job_id}"),
    )
    add_event(session, job_id, "retrying", f"will retry in {delay_seconds:.0f} s: {error['message']}", error, "warning")


def delete_adapter(session: Session, job_id: int, adapter: str) -> None:
    """Detach a succeeded job from its adapter (the files are removed by the caller after commit)."""
    where = and_(col(Job.id) == job_id, col(Job.status) == JobStatus.succeeded, col(Job.adapter) == adapter)
    _guarded(session, where, {"adapter": None}, TransitionError(f"job {job_id} has no adapter {adapter}"))
    add_event(session, job_id, "adapter_deleted", f"adapter {adapter} deleted", {"adapter": adapter})


def cancel(session: Session, job_id: int) -> Job:
    _guarded(
        session,
        and_(col(Job.id) == job_id, col(Job.status).in_([JobStatus.queued, JobStatus.running])),
        {"status": JobStatus.cancelled, "finished_at": utcnow(), "worker_id": None},
        TransitionError(f"job {job_id} is not queued or running"),
    )
    add_event(session, job_id, "cancelled", "job cancelled by request")
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def requeue_stale(session: Session, lease_seconds: float, now: datetime | None = None) -> list[int]:
    """Requeue running jobs whose heartbeat is older than the lease (fail them after max_attempts)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    stale = session.exec(select(Job).where(col(Job.status) == JobStatus.running, col(Job.heartbeat_at) < cutoff)).all()
    moved = []
    for job in stale:
        assert job.id is not None
        lost = {
            "type": "worker_lost",
            "message": f"worker {job.worker_id} stopped heartbeating",
            "hint": "the job is retried automatically",
        }
        exhausted = job.attempts >= job.max_attempts
        values: dict[str, Any] = (
            {
                "status": JobStatus.failed,
                "finished_at": now,
                "worker_id": None,
                "error": {**lost, "hint": f"gave up after {job.attempts} attempts; check the worker's logs"},
            }
            if exhausted
            else {"status": JobStatus.queued, "worker_id": None, "heartbeat_at": None, "run_after": now, "error": lost}
        )
        where = and_(col(Job.id) == job.id, col(Job.status) == JobStatus.running, col(Job.heartbeat_at) < cutoff)
        if session.execute(update(Job).where(where).values(**values)).rowcount == 1:  # type: ignore[attr-defined]
            add_event(session, job.id, "failed" if exhausted else "requeued", lost["message"], lost, "warning")
            moved.append(job.id)
    return moved


# ------------------------------------------------------------------------------------------------------ reads
def get(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def list_jobs(session: Session, status: JobStatus | None, after: int | None, limit: int) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the id of the last job of the previous page."""
    query = select(Job).order_by(col(Job.id).desc()).limit(limit + 1)
    if status is not None:
        query = query.where(col(Job.status) == status)
    if after is not None:
        query = query.where(col(Job.id) < after)
    rows = list(session.exec(query).all())
    return rows[:limit], len(rows) > limit


def list_events(session: Session, job_id: int, after: int | None, limit: int) -> tuple[list[JobEvent], bool]:
    query = select(JobEvent).where(col(JobEvent.job_id) == job_id).order_by(col(JobEvent.id)).limit(limit + 1)
    if after is not None:
        query = query.where(col(JobEvent.id) > after)
    rows = list(session.exec(query).all())
    return rows[:limit], len(rows) > limit


def list_events_newest_first(
    session: Session, job_id: int, before: int | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """A job's events, newest first (the OpenAI fine-tuning events' order); ``before``: the id of the last event of
    the previous page."""
    query = select(JobEvent).where(col(JobEvent.job_id) == job_id).order_by(col(JobEvent.id).desc()).limit(limit + 1)
    if before is not None:
        query = query.where(col(JobEvent.id) < before)
    rows = list(session.exec(query).all())
    return rows[:limit], len(rows) > limit


def count_queued(session: Session) -> int:
    """Queued jobs, also those waiting out a retry backoff (what ``max_queued_jobs`` bounds)."""
    return int(session.exec(select(func.count()).select_from(Job).where(col(Job.status) == JobStatus.queued)).one())


def count_by_status(session: Session) -> dict[str, int]:
    """Jobs of each status (every status named, 0 where there is none)."""
    counts = {str(status): 0 for status in JobStatus}
    for status, count in session.exec(select(Job.status, func.count()).group_by(col(Job.status))).all():
        counts[str(status)] = int(count)
    return counts


def runnable_queue(session: Session, now: datetime) -> tuple[int, datetime | None]:
    """How many queued jobs a free worker would claim at ``now``, and the earliest ``run_after`` among them (a
    queued job waits for a worker from then on: its creation, or the end of a retry backoff)."""
    count, oldest = session.exec(
        select(func.count(), func.min(col(Job.run_after))).where(
            col(Job.status) == JobStatus.queued, col(Job.run_after) <= now
        )
    ).one()
    return int(count), oldest


def running_progress(session: Session) -> list[tuple[int, dict[str, Any]]]:
    """``(id, progress)`` of every running job."""
    rows = session.exec(select(Job.id, Job.progress).where(col(Job.status) == JobStatus.running)).all()
    return [(int(job_id), dict(progress or {})) for job_id, progress in rows if job_id is not None]


def find_by_idempotency_key(session: Session, key: str) -> Job | None:
    return session.exec(select(Job).where(col(Job.idempotency_key) == key)).first()


def succeeded_jobs(session: Session) -> list[Job]:
    return list(
        session.exec(select(Job).where(col(Job.status) == JobStatus.succeeded).order_by(col(Job.id).desc())).all()
    )
