"""The job store with several processes: a claim race between 8 processes (each row claimed once, SQLite and
PostgreSQL), and ``flashtune`` refusing to start on an SQLite file that cannot use WAL."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from sqlalchemy import func, insert, select

from service.jobs import jobstore
from service.jobs.db import init_db, make_engine, session_scope
from service.jobs.models import Job, JobEvent, utcnow
from tests.conftest import read_only_sqlite_url

HP = {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "gradient_accumulation_steps": 1}
RACE_ROWS = 2000
RACE_PROCESSES = 8


def _claim_all(url: str, worker: str, start_at: float) -> tuple[list[int], list[str]]:
    """One racing process: claim until the queue is empty. Returns (claimed ids, errors that reached us)."""
    engine = make_engine(url)
    claimed: list[int] = []
    errors: list[str] = []
    time.sleep(max(start_at - time.time(), 0))  # all processes start claiming together
    misses = 0
    while misses < 3:  # an empty answer can mean "all remaining rows are locked right now": ask again
        try:
            with session_scope(engine) as session:
                job = jobstore.claim_next(session, worker)
        except Exception:
            errors.append(traceback.format_exc(limit=2))
            continue
        if job is None:
            misses += 1
            time.sleep(0.05)
        else:
            assert job.id is not None
            claimed.append(job.id)
            misses = 0
    engine.dispose()
    return claimed, errors


def test_claim_race_each_row_claimed_once(db_url: str) -> None:
    engine = make_engine(db_url)
    init_db(engine)
    now = utcnow()
    with session_scope(engine) as session:
        session.execute(
            insert(Job),
            [
                {
                    "base_model": "builtin",
                    "dataset": "builtin",
                    "hyperparameters": HP,
                    "progress": {},
                    "status": "queued",
                    "attempts": 0,
                    "max_attempts": 3,
                    "run_after": now,
                    "created_at": now,
                }
                for _ in range(RACE_ROWS)
            ],
        )
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 8  # after every process has imported SQLAlchemy
    with context.Pool(RACE_PROCESSES) as pool:
        results = pool.starmap(_claim_all, [(db_url, f"w{i}", start_at) for i in range(RACE_PROCESSES)])
    errors = [e for _, errs in results for e in errs]
    assert errors == [], errors[:3]
    claimed = [job_id for ids, _ in results for job_id in ids]
    assert len(claimed) == RACE_ROWS and len(set(claimed)) == RACE_ROWS
    assert sum(1 for ids, _ in results if ids) >= 2, [len(ids) for ids, _ in results]  # they really raced
    with session_scope(engine) as session:
        rows = session.execute(select(Job.status, Job.attempts, func.count()).group_by(Job.status, Job.attempts)).all()
        started = session.execute(select(func.count()).select_from(JobEvent).where(JobEvent.type == "started"))
        assert [tuple(r) for r in rows] == [("running", 1, RACE_ROWS)]
        assert started.scalar_one() == RACE_ROWS
    print(f"\n{db_url.split(':')[0]}: claims per process {sorted(len(ids) for ids, _ in results)}")
    engine.dispose()


def test_service_refuses_to_start_without_wal(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLASHTUNE_DATA_DIR": str(tmp_path / "data"),
        "FLASHTUNE_DATABASE_URL": read_only_sqlite_url(tmp_path),
        "FLASHTUNE_PORT": "1",
    }
    for command in (["serve"], ["worker", "--max-jobs", "1"]):
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", *command], env=env, capture_output=True, text=True, timeout=120
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "could not switch to WAL mode" in output, output
