"""Fencing a job attempt (issue 20): only the supervising worker extends the lease, every write on behalf of an
attempt names it (job, worker, attempt number), and writes into DATA_DIR (checkpoints, pruning, the adapter, the
step log) happen while the job's row is held, on SQLite and on PostgreSQL. No processes: the real-process cases
(kill -9 of the worker, the fork server, the training process) are in tests/integration/test_worker_death.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import Engine

from service.core.config import Settings
from service.jobs import jobstore
from service.jobs.db import session_scope
from service.jobs.models import Job, Progress
from tests.conftest import PeftStandIn
from workers.child import _Reporter
from workers.training import checkpoints
from workers.training.recipe import publish_adapter

HP = {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "gradient_accumulation_steps": 1}


def _claimed(engine: Engine, worker: str = "w1") -> Job:
    with session_scope(engine) as session:
        jobstore.create(session, Job(base_model="builtin", dataset="builtin", hyperparameters=HP))
    with session_scope(engine) as session:
        job = jobstore.claim_next(session, worker)
        assert job is not None and job.id is not None
        return job


def _job(engine: Engine, job_id: int) -> Job:
    with session_scope(engine) as session:
        job = jobstore.get(session, job_id)
        assert job is not None
        return job


def _take_over(engine: Engine, job_id: int, worker: str = "w2") -> None:
    """What another worker does once the lease expired: requeue the job and claim it (attempt 2)."""
    with session_scope(engine) as session:
        assert jobstore.requeue_stale(session, lease_seconds=-1) == [job_id]
    with session_scope(engine) as session:
        assert jobstore.claim_next(session, worker) is not None


def test_writes_name_the_attempt(engine: Engine) -> None:
    job = _claimed(engine)
    assert job.id is not None and job.attempts == 1
    writes = [
        lambda s, n: jobstore.heartbeat(s, job.id, "w1", n),
        lambda s, n: jobstore.hold(s, job.id, "w1", n),
        lambda s, n: jobstore.update_progress(s, job.id, "w1", {"step": 1}, attempt=n),
        lambda s, n: jobstore.update_hyperparameters(s, job.id, "w1", HP, attempt=n),
    ]
    for write in writes:
        with pytest.raises(jobstore.LeaseLost), session_scope(engine) as session:
            write(session, 2)  # the same worker, another attempt: a leftover process of an earlier claim
        with session_scope(engine) as session:
            write(session, 1)
    with pytest.raises(jobstore.LeaseLost), session_scope(engine) as session:
        jobstore.succeed(session, job.id, "w1", "job-1", {}, attempt=2)
    with session_scope(engine) as session:
        jobstore.succeed(session, job.id, "w1", "job-1", {}, attempt=1)
    assert _job(engine, job.id).status == "succeeded"


def test_progress_is_not_a_heartbeat(engine: Engine) -> None:
    """A training process whose worker died must not keep the job's lease alive by reporting."""
    job = _claimed(engine)
    assert job.id is not None
    claimed_at = _job(engine, job.id).heartbeat_at
    time.sleep(0.05)
    with session_scope(engine) as session:
        jobstore.update_progress(session, job.id, "w1", {"step": 3}, attempt=1)
        jobstore.hold(session, job.id, "w1", 1)
    assert _job(engine, job.id).heartbeat_at == claimed_at
    with session_scope(engine) as session:
        jobstore.heartbeat(session, job.id, "w1", 1)
    heartbeat_at = _job(engine, job.id).heartbeat_at
    assert heartbeat_at is not None and claimed_at is not None and heartbeat_at > claimed_at


def test_hold_keeps_a_takeover_out_until_the_write_is_done(engine: Engine) -> None:
    """While an attempt holds its row (a checkpoint or the adapter being renamed), a requeue waits; it commits only
    after the attempt's write: the write can never land after the takeover."""
    job = _claimed(engine)
    assert job.id is not None
    order: list[str] = []

    def requeue() -> None:
        with session_scope(engine) as session:
            jobstore.requeue_stale(session, lease_seconds=-1)
        order.append("requeued")

    with session_scope(engine) as session:
        jobstore.hold(session, job.id, "w1", 1)
        sweeper = threading.Thread(target=requeue)
        sweeper.start()
        time.sleep(0.5)
        order.append("written")  # the fenced write, e.g. os.replace of a checkpoint
    sweeper.join(30)
    assert order == ["written", "requeued"]
    assert _job(engine, job.id).status == "queued"


@pytest.fixture
def reporter(tmp_path: Path, db_url: str, engine: Engine) -> tuple[_Reporter, int]:
    job = _claimed(engine)
    assert job.id is not None
    settings = Settings(data_dir=tmp_path, database_url=db_url, progress_interval_seconds=0)
    return _Reporter(settings, job.id, "w1", attempt=1), job.id


def _progress(step: int) -> Progress:
    return Progress(step=step, total_steps=10, epoch=step / 10, total_epochs=1, loss=1.0, fraction=step / 10)


def test_a_stale_attempt_writes_nothing(reporter: tuple[_Reporter, int], engine: Engine) -> None:
    rep, job_id = reporter
    rep.progress(_progress(1), force=True)
    rep.event("checkpoint", "checkpoint at step 1", {"step": 1})
    with rep.fence("publish"):
        pass
    steps_file = rep.steps.path
    logged = steps_file.read_text()
    assert '"step": 1' in logged
    _take_over(engine, job_id)
    with pytest.raises(jobstore.LeaseLost):
        rep.progress(_progress(2), force=True)
    with pytest.raises(jobstore.LeaseLost):
        rep.event("checkpoint", "checkpoint at step 2", {"step": 2})
    with pytest.raises(jobstore.LeaseLost), rep.fence("checkpoint"):
        raise AssertionError("a stale attempt's fenced write ran")
    assert rep.should_stop()
    assert steps_file.read_text() == logged  # step 2 never reached the step log
    with session_scope(engine) as session:
        events, _ = jobstore.list_events(session, job_id, None, 100)
    assert [e.type for e in events].count("published") == 1 and [e.type for e in events].count("checkpoint") == 1
    assert _job(engine, job_id).progress["step"] == 1


class _Refused(Exception):
    pass


def _refuse(action: str) -> Any:
    raise _Refused(action)


def test_checkpoints_and_pruning_go_through_the_fence(tmp_path: Path) -> None:
    model = PeftStandIn()
    optimizer = torch.optim.AdamW(model.layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (2, 4):
        checkpoints.save(tmp_path, step, model, optimizer, scheduler, {})
    before = checkpoints.complete(tmp_path)
    with pytest.raises(_Refused, match="checkpoint"):
        checkpoints.save(tmp_path, 6, model, optimizer, scheduler, {}, fence=_refuse)
    with pytest.raises(_Refused, match="prune"):
        checkpoints.prune(tmp_path, keep=0, fence=_refuse)
    assert checkpoints.complete(tmp_path) == before  # no step 6, nothing pruned
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []


def test_publishing_goes_through_the_fence(tmp_path: Path) -> None:
    adapter = tmp_path / "adapters" / "job-1"
    publish_adapter(PeftStandIn(), None, {"losses": {}}, adapter)
    published = {p.name: p.read_bytes() for p in adapter.iterdir()}
    with pytest.raises(_Refused, match="publish"):
        publish_adapter(PeftStandIn(), None, {"losses": {"step_loss": [[1, 0.5]]}, "other": 1}, adapter, fence=_refuse)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == published
    assert [p.name for p in adapter.parent.iterdir()] == ["job-1"]  # the refused copy was removed


def test_publishing_removes_what_a_killed_attempt_left(tmp_path: Path) -> None:
    """An attempt killed while writing its adapter leaves its temporary folder; the attempt that publishes removes
    it, and only the job's own (job-10's is another job's)."""
    adapters = tmp_path / "adapters"
    for name in (".job-1-k1lled_x", ".job-10-otherjob"):
        (adapters / name).mkdir(parents=True)
        (adapters / name / "adapter_model.safetensors").write_bytes(b"half")
    publish_adapter(PeftStandIn(), None, {"losses": {}}, adapters / "job-1")
    assert sorted(p.name for p in adapters.iterdir()) == [".job-10-otherjob", "job-1"]
