"""The job store's state machine on SQLite and on the real PostgreSQL server (127.0.0.1:5432): every transition,
lease-guarded writes, reads that never wait for a writer, and the refusal of an SQLite file that cannot use WAL
(the claim race between processes and the service's refusal to start are in
tests/integration/test_jobstore_processes.py).

PostgreSQL tests create their own database per test and drop it afterwards; they never skip (CI has PostgreSQL).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from service.jobs import jobstore
from service.jobs.db import DatabaseError, init_db, make_engine, session_scope
from service.jobs.models import Job, JobStatus, utcnow
from tests.conftest import read_only_sqlite_url
from tests.pgdb import postgres_database

HP = {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "gradient_accumulation_steps": 1}


def _new_job(engine: Engine, max_attempts: int = 3) -> int:
    with session_scope(engine) as session:
        job = jobstore.create(
            session, Job(base_model="builtin", dataset="builtin", hyperparameters=HP, max_attempts=max_attempts)
        )
        assert job.id is not None
        return job.id


def _job(engine: Engine, job_id: int) -> Job:
    with session_scope(engine) as session:
        job = jobstore.get(session, job_id)
        assert job is not None
        return job


def _claim(engine: Engine, worker: str, **kwargs: Any) -> Job | None:
    with session_scope(engine) as session:
        return jobstore.claim_next(session, worker, **kwargs)


def _event_types(engine: Engine, job_id: int) -> list[str]:
    with session_scope(engine) as session:
        events, _ = jobstore.list_events(session, job_id, None, 1000)
        return [e.type for e in events]


def test_claim_progress_succeed(engine: Engine) -> None:
    job_id = _new_job(engine)
    claimed = _claim(engine, "w1")
    assert claimed is not None and claimed.id == job_id
    assert (claimed.status, claimed.worker_id, claimed.attempts) == (JobStatus.running, "w1", 1)
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    assert _claim(engine, "w2") is None  # nothing else queued
    with session_scope(engine) as session:
        jobstore.heartbeat(session, job_id, "w1")
        jobstore.update_progress(session, job_id, "w1", {"step": 3, "total_steps": 10})
        jobstore.update_hyperparameters(session, job_id, "w1", {**HP, "micro_batch_size": 2})
    with session_scope(engine) as session:
        jobstore.succeed(session, job_id, "w1", "job-1", {"step": 10, "total_steps": 10})
    job = _job(engine, job_id)
    assert (job.status, job.adapter, job.worker_id, job.progress["step"]) == ("succeeded", "job-1", None, 10)
    assert job.hyperparameters["micro_batch_size"] == 2 and job.finished_at is not None
    assert _event_types(engine, job_id) == ["queued", "started", "succeeded"]
    with pytest.raises(jobstore.LeaseLost), session_scope(engine) as session:  # a finished job takes no writes
        jobstore.update_progress(session, job_id, "w1", {"step": 11})


def test_fail_and_retry_with_backoff(engine: Engine) -> None:
    failing, retried = _new_job(engine), _new_job(engine)
    assert _claim(engine, "w1") is not None and _claim(engine, "w1") is not None
    with session_scope(engine) as session:
        jobstore.fail(session, failing, "w1", {"type": "bad_data", "message": "no examples", "hint": "upload more"})
        jobstore.retry(session, retried, "w1", {"type": "io_error", "message": "disk full", "hint": None}, 60)
    job = _job(engine, failing)
    assert job.status == "failed" and job.error == {"type": "bad_data", "message": "no examples", "hint": "upload more"}
    job = _job(engine, retried)
    assert (job.status, job.worker_id, job.heartbeat_at, job.attempts) == ("queued", None, None, 1)
    assert _claim(engine, "w2") is None  # backing off: not runnable for 60 s
    later = _claim(engine, "w2", now=utcnow() + timedelta(seconds=61))
    assert later is not None and later.id == retried and later.attempts == 2
    assert _event_types(engine, retried) == ["queued", "started", "retrying", "started"]


def test_cancel(engine: Engine) -> None:
    queued, running = _new_job(engine), _new_job(engine)
    assert _claim(engine, "w1") is not None  # the oldest one: ``queued``
    with session_scope(engine) as session:
        assert jobstore.cancel(session, queued).status == "cancelled"
    # The running job was claimed by nobody yet; claim and cancel it: the worker's next write loses the lease.
    assert _claim(engine, "w1") is not None
    with session_scope(engine) as session:
        jobstore.cancel(session, running)
    with pytest.raises(jobstore.LeaseLost), session_scope(engine) as session:
        jobstore.heartbeat(session, running, "w1")
    with pytest.raises(jobstore.TransitionError), session_scope(engine) as session:
        jobstore.cancel(session, running)  # already cancelled
    assert _job(engine, running).status == "cancelled"


def test_requeue_stale_then_fail_after_max_attempts(engine: Engine) -> None:
    job_id = _new_job(engine, max_attempts=2)
    assert _claim(engine, "w1") is not None
    later = utcnow() + timedelta(seconds=120)  # the sweep runs 120 s after the last heartbeat
    with session_scope(engine) as session:
        assert jobstore.requeue_stale(session, lease_seconds=300, now=later) == []  # within the lease
        assert jobstore.requeue_stale(session, lease_seconds=60, now=later) == [job_id]
    job = _job(engine, job_id)
    assert (job.status, job.worker_id, job.heartbeat_at, job.attempts) == ("queued", None, None, 1)
    assert job.error is not None and job.error["type"] == "worker_lost"
    second = _claim(engine, "w2", now=later)
    assert second is not None and second.attempts == 2 and second.worker_id == "w2"
    with session_scope(engine) as session:  # stalls again, attempts == max_attempts: failed
        assert jobstore.requeue_stale(session, lease_seconds=60, now=later + timedelta(seconds=61)) == [job_id]
    job = _job(engine, job_id)
    assert job.status == "failed" and job.error is not None and "gave up after 2 attempts" in job.error["hint"]
    assert _event_types(engine, job_id) == ["queued", "started", "requeued", "started", "failed"]


def test_stale_worker_writes_change_nothing(engine: Engine) -> None:
    """Worker A stalls past its lease, the sweep requeues the job, B takes it: every write of A raises LeaseLost."""
    job_id = _new_job(engine)
    assert _claim(engine, "A") is not None
    later = utcnow() + timedelta(seconds=30)
    with session_scope(engine) as session:
        assert jobstore.requeue_stale(session, lease_seconds=10, now=later) == [job_id]
    assert _claim(engine, "B", now=later) is not None
    with session_scope(engine) as session:
        jobstore.update_progress(session, job_id, "B", {"step": 5})
    before = _job(engine, job_id)
    error = {"type": "x", "message": "stale", "hint": None}
    for write in (
        lambda s: jobstore.heartbeat(s, job_id, "A"),
        lambda s: jobstore.update_progress(s, job_id, "A", {"step": 99}),
        lambda s: jobstore.update_hyperparameters(s, job_id, "A", {**HP, "micro_batch_size": 1}),
        lambda s: jobstore.succeed(s, job_id, "A", "job-stale", {"step": 99}),
        lambda s: jobstore.fail(s, job_id, "A", error),
        lambda s: jobstore.retry(s, job_id, "A", error, 0),
    ):
        with pytest.raises(jobstore.LeaseLost), session_scope(engine) as session:
            write(session)
    after = _job(engine, job_id)
    assert after.model_dump() == before.model_dump()
    assert (after.status, after.worker_id, after.progress, after.attempts) == ("running", "B", {"step": 5}, 2)
    assert _event_types(engine, job_id) == ["queued", "started", "requeued", "started"]  # no event leaked from A


def test_reads_never_wait_for_a_writer(engine: Engine) -> None:
    """A writer stopped inside its transaction (SIGSTOP, a paused VM) holds SQLite's write lock or PostgreSQL's row
    lock until it goes on; read-only sessions, the API's GETs, answer meanwhile with the last committed state."""
    job_id = _new_job(engine)
    with session_scope(engine) as writer:
        jobstore.cancel(writer, job_id)
        writer.flush()  # the lock is held from here to the commit
        with session_scope(engine, read_only=True) as reader:  # another pooled connection
            job = jobstore.get(reader, job_id)
            assert job is not None and job.status == JobStatus.queued
    assert _job(engine, job_id).status == JobStatus.cancelled


def test_read_only_session_refuses_writes(engine: Engine) -> None:
    job_id = _new_job(engine)
    with pytest.raises(DatabaseError, match="read-only"), session_scope(engine, read_only=True) as session:
        job = jobstore.get(session, job_id)
        assert job is not None
        job.status = JobStatus.cancelled
    assert _job(engine, job_id).status == JobStatus.queued


def test_postgres_ends_a_transaction_left_idle() -> None:
    """A worker stopped inside a transaction would keep its job's row locked, blocking the other workers' sweep."""
    with postgres_database() as url:
        engine = make_engine(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "5min"
        engine.dispose()


def test_refuses_sqlite_without_wal(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="WAL"):
        init_db(make_engine(read_only_sqlite_url(tmp_path)))
