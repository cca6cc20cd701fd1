"""Who removes a job's checkpoints, and when (issue 21, "run twice in a row"): the worker, once the transaction that
records the job's success has committed; never the attempt that publishes the adapter. Before, the attempt removed
them right after publishing, and a worker that died before recording the success left a job that was requeued with
no checkpoint: the next attempt trained it again from step 0. No processes: the worker's ``_record`` with the
outcome a child sends, on SQLite and PostgreSQL (the real-process kills are in tests/integration/)."""

from __future__ import annotations

from pathlib import Path

import torch
from sqlalchemy import Engine

from service.core.config import Settings
from service.jobs import jobstore
from service.jobs.db import session_scope
from service.jobs.hyperparameters import Hyperparameters, resolve
from service.jobs.models import Job, JobStatus
from tests.conftest import PeftStandIn
from workers.retry import Outcome
from workers.training import checkpoints
from workers.worker import Worker

HP = resolve(Hyperparameters(), "builtin").model_dump()


def _claimed(engine: Engine, worker: str) -> Job:
    with session_scope(engine) as session:
        jobstore.create(session, Job(base_model="builtin", dataset="builtin", hyperparameters=HP))
    with session_scope(engine) as session:
        job = jobstore.claim_next(session, worker)
        assert job is not None and job.id is not None
        return job


def _checkpointed(settings: Settings, job_id: int, steps: tuple[int, ...] = (4, 8)) -> Path:
    """The checkpoints an attempt wrote while it trained (and a leftover of an interrupted write)."""
    job_dir = settings.layout.job_dir(job_id)
    model = PeftStandIn()
    optimizer = torch.optim.AdamW(model.layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in steps:
        checkpoints.save(job_dir, step, model, optimizer, scheduler, {})
    (job_dir / "checkpoints" / ".tmp-step-00000012-999").mkdir()
    return job_dir


def _status(engine: Engine, job_id: int) -> str:
    with session_scope(engine) as session:
        job = jobstore.get(session, job_id)
        assert job is not None
        return str(job.status)


def _settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url)


def test_the_worker_removes_the_checkpoints_once_the_success_is_recorded(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    settings = _settings(tmp_path, db_url)
    worker = Worker(settings, "w1")
    job = _claimed(engine, "w1")
    assert job.id is not None
    job_dir = _checkpointed(settings, job.id)
    worker._record(job, Outcome("succeeded", adapter=f"job-{job.id}", progress={"step": 12}))
    assert _status(engine, job.id) == JobStatus.succeeded
    assert checkpoints.complete(job_dir) == [] and list((job_dir / "checkpoints").iterdir()) == []


def test_a_success_that_is_not_recorded_leaves_the_checkpoints_to_the_takeover(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    """The attempt published its adapter, but its worker lost the job before recording the success (it stalled past
    the lease, or died and the sweep requeued the job): the takeover resumes from the newest checkpoint."""
    settings = _settings(tmp_path, db_url)
    job = _claimed(engine, "w1")
    assert job.id is not None
    job_dir = _checkpointed(settings, job.id)
    with session_scope(engine) as session:
        assert jobstore.requeue_stale(session, lease_seconds=-1) == [job.id]
    Worker(settings, "w1")._record(job, Outcome("succeeded", adapter=f"job-{job.id}", progress={}))
    assert _status(engine, job.id) == JobStatus.queued
    assert [p.name for p in checkpoints.complete(job_dir)] == ["step-00000004", "step-00000008"]


def test_a_retried_job_keeps_its_checkpoints(tmp_path: Path, db_url: str, engine: Engine) -> None:
    settings = _settings(tmp_path, db_url)
    job = _claimed(engine, "w1")
    assert job.id is not None
    job_dir = _checkpointed(settings, job.id)
    Worker(settings, "w1")._record(job, Outcome("interrupted", progress={"step": 8}))
    assert _status(engine, job.id) == JobStatus.queued
    assert [p.name for p in checkpoints.complete(job_dir)] == ["step-00000004", "step-00000008"]


def test_a_starting_worker_clears_what_a_worker_that_died_after_a_success_left(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    """The success committed, then the worker died before removing the checkpoints: the next worker to start removes
    them. A job that is still running keeps its own."""
    settings = _settings(tmp_path, db_url)
    done = _claimed(engine, "w1")
    running = _claimed(engine, "w2")
    assert done.id is not None and running.id is not None
    done_dir, running_dir = _checkpointed(settings, done.id), _checkpointed(settings, running.id)
    with session_scope(engine) as session:
        jobstore.succeed(session, done.id, "w1", f"job-{done.id}", {}, attempt=1)
    Worker(settings, "w3").clear_finished_checkpoints()
    assert checkpoints.complete(done_dir) == []
    assert len(checkpoints.complete(running_dir)) == 2
