"""Crashes, stalls, restarts and many workers, with real processes and real signals.

Every test reads a number off the job: its attempts, the step it resumed from, the micro-batch it finished at.
Leases are short here (FLASHTUNE_LEASE_SECONDS=8, heartbeat 0.5 s) so a takeover happens within seconds.
Jobs train on a small uploaded dataset (tens of examples) so each takes seconds, not minutes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.llm.builtin.data import generate
from tests.conftest import Service, make_service, wait_for
from tests.pgdb import postgres_database
from workers.training import checkpoints

pytestmark = pytest.mark.slow


CHECKPOINT_EVERY = 2


LEASE_SECONDS = 8


ENV = {"FLASHTUNE_LEASE_SECONDS": str(LEASE_SECONDS), "FLASHTUNE_CHECKPOINT_EVERY_STEPS": str(CHECKPOINT_EVERY)}


SHORT = {"epochs": 1, "validation_fraction": 0.0}  # 24 examples, batch 4: 6 steps


# 48 steps, a checkpoint every 2 and at each epoch: long enough that a signal sent after the first checkpoint
# still finds the job running (with 18 steps a fast machine finished the job before the SIGTERM arrived)
LONGER = {"epochs": 8, "validation_fraction": 0.0}


WAIT = 900  # seconds; generous because CI machines may be shared (no timing is asserted)


def upload_small(svc: Service, count: int, seed: int = 7) -> str:
    """Upload ``count`` template examples (instruction JSONL); returns the dataset id."""
    lines = [
        json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}, ensure_ascii=False)
        for e in generate(count, seed)
    ]
    response = svc.client.post("/datasets", files={"file": ("small.jsonl", "\n".join(lines).encode(), "text/plain")})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def events(svc: Service, job_id: int) -> list[dict[str, Any]]:
    body = svc.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()
    return list(body["data"])


def of_type(evs: list[dict[str, Any]], *types: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["type"] in types]


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the worker's fork server and the training process forked from it), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def signal_tree(worker: subprocess.Popen[bytes], sig: int) -> list[int]:
    """Send ``sig`` to a worker and its training child (a host that crashes or is paused takes both)."""
    pids = [worker.pid, *children(worker.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def pause_outside_a_write(svc: Service, worker: subprocess.Popen[bytes]) -> list[int]:
    """SIGSTOP a worker and its training child at a moment when neither holds SQLite's write lock. Stopped inside
    a write (a heartbeat or a progress update lasts milliseconds), a process stalls every writer, the other worker
    included, until it resumes: the lock belongs to the database file. (Workers that share a queue across hosts,
    where a paused VM is a real event, use PostgreSQL, whose server ends such a transaction: service/jobs/db.py.)"""
    for _ in range(50):
        paused = signal_tree(worker, signal.SIGSTOP)
        with contextlib.closing(sqlite3.connect(svc.data_dir / "flashtune.db", timeout=1, isolation_level=None)) as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("ROLLBACK")
                return paused
            except sqlite3.OperationalError:  # "database is locked": stopped mid-write; let it finish, try again
                for pid in paused:
                    os.kill(pid, signal.SIGCONT)
        time.sleep(random.uniform(0.05, 0.3))
    raise AssertionError("the worker held the database's write lock at each of 50 pauses\n" + svc.logs())


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids), timeout, "exit")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _is_training_child(pid: int, worker_pid: int) -> bool:
    """Not the worker's resource tracker, nor its fork server (a child of the worker; the training process forked
    from the server has the same command line, but the server as its parent)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return False
    return b"resource_tracker" not in command and not (b"forkserver" in command and parent == worker_pid)


def checkpointed_past(svc: Service, job_id: int, step: int) -> bool:
    """True once the job wrote a checkpoint at or after ``step`` and is still running."""
    evs = events(svc, job_id)
    return svc.job(job_id)["status"] == "running" and any(e["data"]["step"] >= step for e in of_type(evs, "checkpoint"))


@pytest.fixture
def svc(tmp_path: Path, builtin_model_cache: Path) -> Iterator[Service]:
    service = make_service(tmp_path, builtin_model_cache, workers=1, env=ENV)
    yield service
    service.stop()


def test_the_worker_removes_the_checkpoints_once_the_success_is_recorded(svc: Service) -> None:
    """The attempt leaves its checkpoints when it publishes; its worker removes them after recording the success
    (docs/reliability.md), so that a takeover in between resumes from them instead of from step 0."""
    dataset = upload_small(svc, 24)
    job = svc.post_job(dataset=dataset, hyperparameters={"epochs": 1, "validation_fraction": 0.0})  # 6 steps
    done = svc.wait(job["id"], timeout=WAIT)
    assert done["status"] == "succeeded", (done, svc.logs())
    assert of_type(events(svc, job["id"]), "checkpoint")  # it checkpointed while it trained
    job_dir = svc.data_dir / "jobs" / str(job["id"])
    wait_for(lambda: checkpoints.complete(job_dir) == [], 30, "the checkpoints removed", svc)
    assert list((job_dir / "checkpoints").iterdir()) == []


def test_kill_9_resumes_from_checkpoint(svc: Service) -> None:
    dataset = upload_small(svc, 24)
    job = svc.post_job(dataset=dataset, hyperparameters=LONGER)
    kill_after = random.randint(CHECKPOINT_EVERY, 12)
    wait_for(lambda: checkpointed_past(svc, job["id"], kill_after), what="a checkpoint", svc=svc)
    wait_gone(signal_tree(svc.workers[0], signal.SIGKILL))  # the worker and its training process, no grace
    at_kill = svc.job(job["id"])
    last_checkpoint = max(e["data"]["step"] for e in of_type(events(svc, job["id"]), "checkpoint"))
    svc.start_worker()
    done = svc.wait(job["id"], timeout=WAIT)
    assert done["status"] == "succeeded", (done, svc.logs())
    assert done["attempts"] == 2 and done["progress"]["step"] == done["progress"]["total_steps"]
    evs = events(svc, job["id"])
    [resumed] = of_type(evs, "resumed")
    resumed_step = resumed["data"]["step"]
    assert resumed_step > 0 and resumed_step >= last_checkpoint
    assert at_kill["progress"]["step"] - resumed_step <= CHECKPOINT_EVERY  # at most one interval redone
    assert [e["type"] for e in of_type(evs, "started", "requeued", "succeeded")] == [
        "started",
        "requeued",
        "started",
        "succeeded",
    ]
    info = json.loads((svc.data_dir / "adapters" / done["adapter"] / "training_info.json").read_text())
    assert info["resumed_from_step"] == resumed_step
    assert sorted(p.name for p in (svc.data_dir / "adapters").iterdir()) == [done["adapter"]]  # nothing half-written
    print(
        f"\nkill -9 at progress step {at_kill['progress']['step']}/{at_kill['progress']['total_steps']}, "
        f"last checkpoint {last_checkpoint}, resumed from {resumed_step}, attempts {done['attempts']}"
    )


def test_sigstop_past_lease_then_sigcont_changes_nothing(svc: Service) -> None:
    dataset = upload_small(svc, 24)
    job = svc.post_job(dataset=dataset, hyperparameters=LONGER)
    wait_for(lambda: checkpointed_past(svc, job["id"], CHECKPOINT_EVERY), what="a checkpoint", svc=svc)
    stalled = svc.workers[0]
    paused = pause_outside_a_write(svc, stalled)  # a paused VM: worker and training process freeze together
    try:
        svc.start_worker()  # takes the job over once the lease has expired
        done = svc.wait(job["id"], timeout=WAIT)
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, svc.logs())
    adapter_file = svc.data_dir / "adapters" / done["adapter"] / "adapter_model.safetensors"
    adapter_bytes = adapter_file.read_bytes()
    before_events = events(svc, job["id"])
    # The stalled worker wakes up: its heartbeat and its child's next write find the lease gone.
    wait_gone([p for p in paused if p != stalled.pid and _is_training_child(p, stalled.pid)])
    wait_for(lambda: "lease lost" in (svc.data_dir / "worker-0.log").read_text(), 60, "the stale worker", svc)
    time.sleep(2)
    after = svc.job(job["id"])
    assert {k: after[k] for k in ("status", "attempts", "progress", "adapter", "finished_at", "error")} == {
        k: done[k] for k in ("status", "attempts", "progress", "adapter", "finished_at", "error")
    }
    assert events(svc, job["id"]) == before_events
    assert adapter_file.read_bytes() == adapter_bytes
    assert checkpoints.complete(svc.data_dir / "jobs" / str(job["id"])) == []  # no stale checkpoint written
    assert stalled.poll() is None  # the stale worker lives on and goes back to the queue
    print(f"\nstalled worker paused {len(paused)} processes; job finished by the other worker, attempts 2")


def test_sigterm_requeues_with_checkpoint(svc: Service) -> None:
    dataset = upload_small(svc, 24)
    job = svc.post_job(dataset=dataset, hyperparameters=LONGER)
    wait_for(lambda: checkpointed_past(svc, job["id"], CHECKPOINT_EVERY), what="a checkpoint", svc=svc)
    svc.workers[0].send_signal(signal.SIGTERM)
    assert svc.workers[0].wait(120) == 0
    stopped = svc.job(job["id"])
    assert stopped["status"] == "queued" and stopped["error"]["type"] == "interrupted", stopped
    evs = events(svc, job["id"])
    stop_checkpoint = of_type(evs, "checkpoint")[-1]["data"]["step"]
    assert stop_checkpoint == stopped["progress"]["step"]  # checkpointed exactly where it stopped
    svc.start_worker()
    done = svc.wait(job["id"], timeout=WAIT)
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, svc.logs())
    [resumed] = of_type(events(svc, job["id"]), "resumed")
    assert resumed["data"]["step"] == stop_checkpoint
    print(f"\nSIGTERM: checkpoint at step {stop_checkpoint}, resumed there on another worker")


def test_injected_oom_halves_micro_batch(tmp_path: Path, builtin_model_cache: Path) -> None:
    """Fault injection (FLASHTUNE_FAULTS=workers.testing:OOM_FROM_MICRO_BATCH_8): the first step at micro-batch 8
    raises torch.OutOfMemoryError; the job is retried at 4 with twice the accumulation. Here each attempt's process
    is spawned, as where the fork server cannot be used (workers.worker.job_process_context); elsewhere it is
    forked."""
    env = {**ENV, "FLASHTUNE_FAULTS": "workers.testing:OOM_FROM_MICRO_BATCH_8", "FLASHTUNE_JOB_PROCESS_START": "spawn"}
    svc = make_service(tmp_path, builtin_model_cache, env=env)
    try:
        dataset = upload_small(svc, 24)
        job = svc.post_job(dataset=dataset, hyperparameters={**SHORT, "batch_size": 8})
        assert (job["hyperparameters"]["micro_batch_size"], job["hyperparameters"]["gradient_accumulation_steps"]) == (
            8,
            1,
        )
        done = svc.wait(job["id"], timeout=WAIT)
        assert done["status"] == "succeeded", (done, svc.logs())
        hp = done["hyperparameters"]
        assert (hp["batch_size"], hp["micro_batch_size"], hp["gradient_accumulation_steps"]) == (8, 4, 2)
        [retry] = of_type(events(svc, job["id"]), "retrying")
        assert retry["data"]["type"] == "out_of_memory" and "micro-batch 8; retrying with 4" in retry["message"]
        print(f"\nOOM at micro-batch 8 -> finished at {hp['micro_batch_size']} x {hp['gradient_accumulation_steps']}")
    finally:
        svc.stop()


def _post_concurrently(svc: Service, key: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    def post(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = svc.client.post("/jobs", json=body, headers={"Idempotency-Key": key})
        return response.status_code, response.json()

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def check_idempotency(svc: Service) -> None:
    body = {"dataset": "builtin", "hyperparameters": {"epochs": 1}}
    results = _post_concurrently(svc, "same-key-1", [body] * 50)
    assert {status for status, _ in results} <= {200, 201}, results[:3]
    assert [status for status, _ in results].count(201) == 1
    assert len({r["id"] for _, r in results}) == 1
    listed = svc.client.get("/jobs", params={"limit": 200}).json()["data"]
    assert len([j for j in listed if j["id"] == results[0][1]["id"]]) == 1
    conflict = svc.client.post(
        "/jobs", json={**body, "hyperparameters": {"epochs": 2}}, headers={"Idempotency-Key": "same-key-1"}
    )
    assert conflict.status_code == 422 and conflict.json()["error"]["type"] == "idempotency_conflict"


def test_idempotency_key_gives_one_job(tmp_path: Path, builtin_model_cache: Path) -> None:
    svc = make_service(tmp_path, builtin_model_cache, workers=0)
    try:
        check_idempotency(svc)
    finally:
        svc.stop()


def test_postgresql_end_to_end(tmp_path: Path, builtin_model_cache: Path) -> None:
    with postgres_database() as url:
        svc = make_service(tmp_path, builtin_model_cache, env={**ENV, "FLASHTUNE_DATABASE_URL": url})
        try:
            check_idempotency(svc)
            dataset = upload_small(svc, 24)
            job = svc.post_job(dataset=dataset, hyperparameters=SHORT)
            done = svc.wait(job["id"], timeout=WAIT)
            assert done["status"] == "succeeded" and done["attempts"] == 1, (done, svc.logs())
            assert "flashtune.db" not in os.listdir(svc.data_dir)  # the SQLite default was not used
        finally:
            svc.stop()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_workers_killed_at_random_every_job_succeeds_once(
    database: str, tmp_path: Path, builtin_model_cache: Path
) -> None:
    jobs, kills = 6, 3
    with postgres_database() if database == "postgresql" else _nothing() as url:
        env = {**ENV, "FLASHTUNE_MAX_ATTEMPTS": "10", **({"FLASHTUNE_DATABASE_URL": url} if url else {})}
        svc = make_service(tmp_path, builtin_model_cache, workers=3, env=env)
        try:
            dataset = upload_small(svc, 24)
            ids = [svc.post_job(dataset=dataset, hyperparameters=SHORT)["id"] for _ in range(jobs)]
            rng = random.Random(1234)
            for _ in range(kills):
                time.sleep(rng.uniform(3, 8))
                victim = rng.choice(wait_for(lambda: _training(svc), WAIT, "a worker running a job", svc))
                if rng.random() < 0.5:  # with its training process, like a host that dies
                    wait_gone(signal_tree(victim, signal.SIGKILL))
                else:  # the worker alone: its fork server and training process die with it (workers.child)
                    orphans = children(victim.pid)
                    victim.kill()
                    victim.wait()
                    wait_gone(orphans, 10)
                svc.start_worker()
            finished = [svc.wait(i, timeout=WAIT) for i in ids]
            _assert_each_succeeded_once(svc, finished)
            attempts = sorted(j["attempts"] for j in finished)
            assert sum(attempts) > jobs, attempts  # the kills hit running jobs
            print(f"\n{database}: {jobs} jobs, {kills} kills, attempts per job {attempts}")
        finally:
            svc.stop()


def _training(svc: Service) -> list[subprocess.Popen[bytes]]:
    """The live workers whose training process is running (a job's, or for a moment the start-up CUDA check)."""
    return [w for w in svc.workers if w.poll() is None and any(_is_training_child(p, w.pid) for p in children(w.pid))]


class _nothing:  # noqa: N801  (a null context manager yielding None, like the PostgreSQL one yields a URL)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _assert_each_succeeded_once(svc: Service, finished: list[dict[str, Any]]) -> None:
    for job in finished:
        assert job["status"] == "succeeded", (job, svc.logs())
        evs = events(svc, job["id"])
        lifecycle = [e["type"] for e in of_type(evs, "started", "requeued", "retrying", "succeeded", "failed")]
        # started, then (requeued|retrying, started)*, then succeeded: never two attempts at once, one success
        assert lifecycle[0] == "started" and lifecycle[-1] == "succeeded" and lifecycle.count("succeeded") == 1
        assert lifecycle.count("started") == job["attempts"], lifecycle
        for before, after in zip(lifecycle, lifecycle[1:], strict=False):
            assert (before == "started") != (after == "started"), lifecycle
        assert (svc.data_dir / "adapters" / job["adapter"] / "adapter_model.safetensors").exists()


def test_job_processes_are_forked_from_the_preloaded_server_where_a_fork_can_use_the_device() -> None:
    """Otherwise every job would fall back to a spawned process silently (slower, the same results)."""
    from multiprocessing.context import ForkServerContext, SpawnContext

    from workers.worker import job_process_context

    assert isinstance(job_process_context("forkserver"), ForkServerContext)
    assert isinstance(job_process_context("spawn"), SpawnContext)
