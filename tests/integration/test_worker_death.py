"""kill -9 of one process of a running attempt: the worker alone, its fork server alone, the training process alone
(issue 20), on SQLite and on PostgreSQL, with real `flashtune serve` / `flashtune worker` processes.

Whichever process dies, no process of the attempt outlives it by more than 2 s, the job succeeds exactly once, the
next attempt resumes from the newest checkpoint the first one completed (a `resumed` event from a step > 0), and the
adapter is published once (one `published` event, written in the same transaction that fences the rename), by the
attempt that succeeded (its number in training_info.json).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Service, make_service, wait_for
from tests.integration.test_reliability import ENV, WAIT, checkpointed_past, children, events, of_type, upload_small
from tests.pgdb import postgres_database

pytestmark = pytest.mark.slow

JOB = {"epochs": 2, "validation_fraction": 0.0}  # 24 examples, batch 4: 12 steps, a checkpoint every 2
GONE_WITHIN = 2.0  # seconds: the promise under test (docs/reliability.md)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if request.param == "sqlite":
        yield {}
    else:
        with postgres_database() as url:
            yield {"FLASHTUNE_DATABASE_URL": url}


@pytest.fixture
def svc(tmp_path: Path, builtin_model_cache: Path, database_env: dict[str, str]) -> Iterator[Service]:
    service = make_service(tmp_path, builtin_model_cache, workers=1, env={**ENV, **database_env})
    yield service
    service.stop()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def attempt_processes(worker: subprocess.Popen[bytes]) -> tuple[int, int]:
    """(fork server, training process) of the worker's running attempt: the server is the worker's child whose
    command line names the fork server; the training process was forked from it."""

    def find() -> tuple[int, int] | None:
        descendants = children(worker.pid)
        servers = [p for p in descendants if _parent(p) == worker.pid and b"forkserver" in _cmdline(p)]
        trainers = [(s, p) for s in servers for p in descendants if _parent(p) == s]
        return trainers[0] if len(trainers) == 1 else None

    found: tuple[int, int] = wait_for(find, 60, "the attempt's processes")
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def assert_gone_within(pids: list[int], seconds: float, since: float) -> float:
    """Every pid has exited (or is a zombie) within ``seconds`` of ``since``; returns how long it took."""
    while any(_alive(p) for p in pids):
        left = {p: _cmdline(p)[:200] for p in pids if _alive(p)}
        assert time.monotonic() - since < seconds, f"still running {seconds} s after the kill: {left}"
        time.sleep(0.02)
    return time.monotonic() - since


def run_until_checkpoint(svc: Service) -> tuple[dict[str, Any], int]:
    """Queue the job and wait until it has checkpointed at or after a random step; returns it and that step."""
    job = svc.post_job(dataset=upload_small(svc, 24), hyperparameters=JOB)
    step = random.choice([2, 4, 6, 8])
    wait_for(lambda: checkpointed_past(svc, job["id"], step), what=f"a checkpoint at step {step}", svc=svc)
    return job, step


def assert_succeeded_once(svc: Service, job_id: int, between: str) -> dict[str, Any]:
    """The job succeeded in 2 attempts (``between`` them: requeued or retrying), the second resumed from the newest
    checkpoint the first completed, and one adapter was published, by attempt 2."""
    done = svc.wait(job_id, timeout=WAIT)
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, svc.logs())
    evs = events(svc, job_id)
    lifecycle = [e["type"] for e in of_type(evs, "started", "requeued", "retrying", "succeeded", "failed")]
    assert lifecycle == ["started", between, "started", "succeeded"], lifecycle
    second = max(i for i, e in enumerate(evs) if e["type"] == "started")
    first_checkpoints = [e["data"]["step"] for e in of_type(evs[:second], "checkpoint")]
    [resumed] = of_type(evs, "resumed")
    # the newest complete checkpoint: the one its last event names, or one completed just before the kill
    assert resumed["data"]["step"] >= max(first_checkpoints) > 0, (resumed, evs)
    [published] = of_type(evs, "published")
    assert published["data"] == {"adapter": done["adapter"], "attempt": 2}
    adapters = svc.data_dir / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == [done["adapter"]]  # nothing half-written beside it
    info = json.loads((adapters / done["adapter"] / "training_info.json").read_text())
    assert (info["attempt"], info["resumed_from_step"]) == (2, resumed["data"]["step"])
    return {"resumed": resumed["data"]["step"], "checkpoints": first_checkpoints}


def test_kill_9_of_the_worker_alone(svc: Service) -> None:
    """The training process dies with its worker (not only when the whole host does): nothing of attempt 1 trains,
    checkpoints or publishes after the kill, and the next worker resumes from its newest checkpoint."""
    job, step = run_until_checkpoint(svc)
    worker = svc.workers[0]
    attempt = list(attempt_processes(worker))  # the fork server and the training process
    others = [p for p in children(worker.pid) if p not in attempt]  # multiprocessing's resource tracker
    killed = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    took = assert_gone_within(attempt, GONE_WITHIN, killed)
    all_gone = assert_gone_within(others, 30, killed)
    worker.wait()
    frozen = (svc.job(job["id"])["progress"], events(svc, job["id"]))
    time.sleep(1)
    assert (svc.job(job["id"])["progress"], events(svc, job["id"])) == frozen  # nothing of attempt 1 writes
    svc.start_worker()  # takes the job over once its lease (8 s) has expired
    result = assert_succeeded_once(svc, job["id"], "requeued")
    print(f"\nworker killed after checkpoint {step}: attempt gone in {took:.2f} s, all in {all_gone:.2f} s; {result}")


def test_kill_9_of_the_fork_server_alone(svc: Service) -> None:
    """The training process dies with the fork server it was forked from; the worker lives on, records the crash,
    and retries the job from its newest checkpoint in a process forked from a new server."""
    job, step = run_until_checkpoint(svc)
    worker = svc.workers[0]
    server, trainer = attempt_processes(worker)
    killed = time.monotonic()
    os.kill(server, signal.SIGKILL)
    took = assert_gone_within([server, trainer], GONE_WITHIN, killed)
    result = assert_succeeded_once(svc, job["id"], "retrying")
    assert worker.poll() is None, svc.logs()  # the worker survived the fork server
    print(f"\nfork server killed after checkpoint {step}: training process gone in {took:.2f} s; {result}")


def test_kill_9_of_the_training_process_alone(svc: Service) -> None:
    """The worker records the crash and retries the job from its newest checkpoint; it survives."""
    job, step = run_until_checkpoint(svc)
    worker = svc.workers[0]
    _, trainer = attempt_processes(worker)
    os.kill(trainer, signal.SIGKILL)
    result = assert_succeeded_once(svc, job["id"], "retrying")
    [retrying] = of_type(events(svc, job["id"]), "retrying")
    assert "killed by SIGKILL" in retrying["message"], retrying
    assert worker.poll() is None, svc.logs()
    print(f"\ntraining process killed after checkpoint {step}: {result}")
