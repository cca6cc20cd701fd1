"""The training child process: one per job attempt, so GPU memory is freed when it exits.

It reads the job, trains it, and sends one ``Outcome`` back through a pipe. Progress and events go straight to
the database, guarded by the attempt (job id, worker id, attempt number); they never extend the lease, which only
the supervising worker's heartbeat does. Every write into ``DATA_DIR`` that outlives the run (a checkpoint, the
step log, pruning, the adapter) happens while the job's row is held (``jobstore.hold``, ``_Reporter.fence``): if a
write finds the job no longer this attempt's (cancelled, or taken over) the child stops at once, without writing
anything: a stale attempt changes nothing. SIGTERM from the worker means "checkpoint and stop".

The child dies with its worker (``die_with_worker``): SIGKILL from the kernel when its parent ends
(``PR_SET_PDEATHSIG``: the worker, or the fork server a forked child's parent is), and a thread that waits on a
pipe only the worker holds open, for the case where the fork server outlives the worker. The takeover resumes from
the newest checkpoint the attempt completed.

Multi-GPU (``FLASHTUNE_GPUS`` > 1): the child loads the job, then becomes torchrun's launcher for N ranks
(``workers.training.distributed.launch``), each running ``rank_main``, i.e. ``run_attempt`` for its rank; rank 0
reports.

Fault injection for tests: ``FLASHTUNE_FAULTS=module:attribute`` names a fault plugin (``workers/testing.py``) that
each training process loads once and wraps its hooks with. Unset, nothing is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from service.core import logs
from service.core.config import Settings
from service.core.layout import adapter_name
from service.datasets.store import DatasetNotFound, load_examples
from service.jobs import aliases, jobstore
from service.jobs.db import make_engine, session_scope
from service.jobs.hyperparameters import ResolvedHyperparameters
from service.jobs.loss_history import StepLog
from service.jobs.models import Progress
from service.llm.base_cache import BaseCache
from service.llm.modeling import ModelLoadError, pick_device, resolve_base_model
from service.llm.prompts import input_fields_used
from workers.retry import Outcome
from workers.training import distributed
from workers.training.distributed import SINGLE, Distributed
from workers.training.recipe import train
from workers.training.spec import FaultPlugin, Hooks, Interrupted, TrainingError, TrainingSpec

log = logging.getLogger("flashtune.child")


class _Reporter:
    """Throttled, attempt-guarded progress writes and events for one job attempt, and the fence around its writes
    into ``DATA_DIR``."""

    def __init__(self, settings: Settings, job_id: int, worker_id: str, attempt: int | None = None) -> None:
        self.engine = make_engine(settings.resolved_database_url)
        self.job_id, self.worker_id, self.attempt = job_id, worker_id, attempt
        self.interval = settings.progress_interval_seconds
        self.last_write = 0.0
        self.stop_requested = False
        self.lease_lost = False
        self.last_progress: dict[str, Any] = {}
        self.unlogged: list[dict[str, Any]] = []  # steps not yet in the step log: written with the next progress
        self.steps = StepLog(settings.layout.job_dir(job_id))  # every step's loss, for GET /jobs/{id}/metrics

    def progress(self, progress: Progress, force: bool) -> None:
        self.last_progress = progress.model_dump()
        self.unlogged.append(self.last_progress)
        now = time.monotonic()
        if not force and now - self.last_write < self.interval:
            return
        self.last_write = now

        def write(session: Session) -> None:
            held = (session, self.job_id, self.worker_id)
            jobstore.update_progress(*held, self.last_progress, attempt=self.attempt)  # the row stays locked
            self._log_steps()

        self._guarded(write)

    def _log_steps(self) -> None:
        """Append the steps since the last progress write to the step log (inside that write: a stale attempt's
        steps never reach the file)."""
        try:
            for record in self.unlogged:
                self.steps.append(record)
        except OSError as exc:  # the loss chart misses points; training goes on
            log.warning("job %s: step log write failed: %s", self.job_id, exc)
        self.unlogged = []

    def event(self, type: str, message: str, data: dict[str, Any]) -> None:
        def write(session: Session) -> None:
            jobstore.hold(session, self.job_id, self.worker_id, self.attempt)  # no event from a stale attempt
            jobstore.add_event(session, self.job_id, type, message, data)

        self._guarded(write)

    @contextlib.contextmanager
    def fence(self, action: str) -> Iterator[None]:
        """Hold the job's row while ``action`` (a checkpoint, pruning, publishing: ``Hooks.fence``) writes into
        ``DATA_DIR``: it happens only while this attempt holds the job, and no takeover commits before it is done.
        Raises ``LeaseLost`` (nothing written) otherwise; a database error ends the attempt (it is retried)."""
        try:
            with session_scope(self.engine) as session:
                jobstore.hold(session, self.job_id, self.worker_id, self.attempt)
                yield
                if action == "publish":  # committed with the rename's fence: one event per adapter published
                    name = adapter_name(self.job_id)
                    data = {"adapter": name, "attempt": self.attempt}
                    jobstore.add_event(session, self.job_id, "published", f"adapter {name} written", data)
        except jobstore.LeaseLost as exc:
            self.lease_lost = True
            raise jobstore.LeaseLost(f"job {self.job_id}: lease lost; {action} not written") from exc

    def _guarded(self, write: Callable[[Session], None]) -> None:
        """Run one lease-guarded write. Lease gone: raise ``LeaseLost`` (training stops before its next checkpoint
        or publish). Database unreachable for a moment: skip this write; the worker's heartbeat keeps the lease."""
        try:
            with session_scope(self.engine) as session:
                write(session)
        except jobstore.LeaseLost as exc:
            self.lease_lost = True
            raise jobstore.LeaseLost(f"job {self.job_id}: lease lost; stopping without writing anything") from exc
        except DBAPIError as exc:
            log.warning("job %s: progress/event write skipped: %s", self.job_id, exc)

    def should_stop(self) -> bool:
        return self.stop_requested or self.lease_lost

    def hooks(self) -> Hooks:
        return Hooks(self.progress, self.event, self.should_stop, self.fence)


def _spec(settings: Settings, job_id: int) -> TrainingSpec:
    engine = make_engine(settings.resolved_database_url)
    with session_scope(engine, read_only=True) as session:  # reading a large dataset must not hold the write lock
        job = jobstore.get(session, job_id)
        assert job is not None and job.id is not None
        hp = ResolvedHyperparameters.model_validate(job.hyperparameters)
        train_set, validation, sha256 = load_examples(
            settings, session, job.dataset, hp.validation_fraction, hp.seed, hp.validation_dataset
        )
        compare_with = aliases.incumbent(session, settings, job)  # promote_to: the adapter it must beat
    engine.dispose()
    return TrainingSpec(
        job_id=job.id,
        base_model=job.base_model,
        base_source=resolve_base_model(job.base_model, settings),
        dataset=job.dataset,
        dataset_sha256=sha256,
        train=train_set,
        validation=validation,
        hp=hp,
        job_dir=settings.layout.job_dir(job.id),
        adapter_dir=settings.layout.adapter_dir(adapter_name(job.id)),
        device=settings.device,
        checkpoint_every=settings.checkpoint_every_steps,
        # which optional fields (metadata, market context) the inputs carry: /analyze passes the adapter only these
        extra_info={"input_fields": input_fields_used(e.input for e in train_set + validation)},
        token_cache_dir=settings.layout.token_cache,
        gpu_memory_gib=settings.gpu_memory_gib,
        compare_with=compare_with,
        compute_dtype=settings.compute_dtype,
        cuda_capability=settings.cuda_capability,
        base_cache=BaseCache(settings.layout.base_cache, settings.base_cache_gib),
    )


def _error(type: str, message: str, hint: str | None) -> dict[str, Any]:
    return {"type": type, "message": message, "hint": hint}


def run_attempt(
    settings: Settings,
    job_id: int,
    worker_id: str,
    dist: Distributed = SINGLE,
    spec: TrainingSpec | None = None,
    attempt: int | None = None,
) -> Outcome:
    """Train attempt ``attempt`` (the job's claim count, its fencing token) of a job and classify how it ended.

    Multi-GPU: in the child this launches the ranks and returns their combined outcome; in a rank (``dist``,
    ``spec`` loaded by the child) it trains that rank's part, and only rank 0's hooks reach the database.
    """
    reporter = _Reporter(settings, job_id, worker_id, attempt)
    signal.signal(signal.SIGTERM, lambda *_: setattr(reporter, "stop_requested", True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which decides for us
    try:
        spec = spec or _spec(settings, job_id)
        if attempt is not None:
            spec.extra_info["attempt"] = attempt  # training_info.json says which attempt published the adapter
        if dist.world == 1 and (world := _world_size(settings)) > 1:
            return _launch_ranks(settings, job_id, worker_id, spec, world, reporter)
        hooks = distributed.rank_hooks(reporter.hooks(), dist)
        train(spec, fault_plugin(settings.faults)(hooks, spec, dist.rank), dist)
        return Outcome("succeeded", adapter=adapter_name(job_id), progress=reporter.last_progress)
    except Interrupted:
        return Outcome("interrupted", progress=reporter.last_progress)
    except Exception as exc:
        return _failed(exc)


def _failed(exc: Exception) -> Outcome:
    """How an attempt that raised ``exc`` ended: the lease lost, out of memory (retried smaller), or a failure, final
    unless the database or the disk was the cause."""
    import torch

    if isinstance(exc, jobstore.LeaseLost):
        return Outcome("lease_lost", _error("lease_lost", str(exc), None))
    if isinstance(exc, torch.OutOfMemoryError):
        return Outcome("oom")
    if isinstance(exc, TrainingError):
        return Outcome("failed", _error(exc.type, str(exc), exc.hint))
    if isinstance(exc, DatasetNotFound):
        return Outcome("failed", _error("dataset_not_found", f"dataset {exc} does not exist", "upload it again"))
    if isinstance(exc, ModelLoadError):
        return Outcome("failed", _error("base_model_error", str(exc), exc.hint))
    if isinstance(exc, DBAPIError):  # the database went away while loading the job: retry later
        message = f"{type(exc).__name__}: {exc.orig}"
        return Outcome("failed", _error("database_error", message, "check FLASHTUNE_DATABASE_URL"), retryable=True)
    if isinstance(exc, OSError):  # disk full, unwritable DATA_DIR, network file system hiccups
        hint = "check free space and permissions of FLASHTUNE_DATA_DIR"
        return Outcome("failed", _error("io_error", f"{type(exc).__name__}: {exc}", hint), retryable=True)
    last = traceback.extract_tb(exc.__traceback__)[-1]  # an unexpected fault in training: final, with the reason
    message = f"{type(exc).__name__}: {exc} (in {last.name})"
    return Outcome("failed", _error("training_error", message, "check the dataset and hyperparameters"))


@functools.cache  # once per process: the child, or a rank
def fault_plugin(name: str) -> FaultPlugin:
    """The fault plugin ``FLASHTUNE_FAULTS`` names (``module:attribute``, tests only: workers/testing.py); without
    one, the hooks as they are."""
    if not name:
        return lambda hooks, spec, rank: hooks
    module, _, attribute = name.partition(":")
    plugin: FaultPlugin = getattr(importlib.import_module(module), attribute)
    log.warning("fault plugin %s installed (FLASHTUNE_FAULTS): for tests only", name)
    return plugin


def child_main(
    settings: Settings,
    job_id: int,
    worker_id: str,
    conn: Connection,
    attempt: int | None = None,
    lifeline: Connection | None = None,
) -> None:
    """Entry point of the child process (forked from the worker's fork server, or spawned; workers/worker.py).
    ``lifeline``: the read end of a pipe whose write end only the worker holds (see ``die_with_worker``)."""
    die_with_worker(lifeline)
    logs.configure(json_lines=settings.log_json)  # a new process starts without the worker's logging set-up
    with logs.bind_job(job_id):
        outcome = run_attempt(settings, job_id, worker_id, attempt=attempt)
    try:
        conn.send(outcome)
        conn.close()
    except OSError:  # the worker is gone (killed): the lease decides what happens to the job
        pass


def die_with_worker(lifeline: Connection | None) -> None:
    """End this process (SIGKILL: no checkpoint, no write; the takeover resumes from the last checkpoint) within
    moments of the worker's death, however the child was started:

    - ``PR_SET_PDEATHSIG`` (Linux): the kernel kills it when its parent ends - the worker for a spawned child,
      the fork server for a forked one (kill -9 of the fork server alone ends the child too);
    - a forked child inherits the fork server's "alive" pipe, whose write end keeps the server running while any
      holder lives: closed here, the server exits with the worker, and the death signal follows;
    - a thread that waits on ``lifeline``: EOF (the worker's end closed, i.e. the worker died) kills the process.
    """
    distributed.die_with_parent(signal.SIGKILL, os.getppid())
    _close_fork_server_alive_fd()
    if lifeline is None:
        return

    def watch() -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                lifeline.recv()  # the worker sends nothing: returns only by raising EOFError when it is gone
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="flashtune-worker-watch", daemon=True).start()


def _close_fork_server_alive_fd() -> None:
    """A process forked from the fork server inherits the write end of the server's "alive" pipe (so that it could
    use the server itself): the server exits only once every holder has closed it. This process never uses it."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]  # CPython's private singleton
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None and getattr(server, "_forkserver_pid", None) is None:  # inherited, not a server of our own
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------- multi-GPU
def _world_size(settings: Settings) -> int:
    if settings.gpus == "1":
        return 1
    return distributed.resolve_world_size(settings.gpus, pick_device(settings.device))


def _launch_ranks(
    settings: Settings, job_id: int, worker_id: str, spec: TrainingSpec, world: int, reporter: _Reporter
) -> Outcome:
    """Train the attempt over ``world`` ranks started by torchrun's launcher; this process is the launcher."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # one process group with the ranks: the worker kills it as a whole when it must kill
    # Each rank dies with this process (distributed.init_rank), and this process with its worker (die_with_worker).
    if reporter.should_stop():  # asked to stop while the job was loading: nothing trained, nothing to save
        return Outcome("interrupted")
    backend = "nccl" if pick_device(settings.device) == "cuda" else "gloo"
    spec.extra_info["distributed"] = {"world_size": world, "backend": backend}
    message = f"data parallel over {world} {backend} processes (torchrun), {spec.hp.batch_size} samples per step in all"
    reporter.event("distributed", message, {"world_size": world, "backend": backend})
    run_dir = Path(tempfile.mkdtemp(prefix=f"flashtune-job-{job_id}-"))
    try:
        args = (settings, job_id, worker_id, spec, str(run_dir), os.getpid(), reporter.attempt)
        return distributed.launch(rank_main, args, world, run_dir, f"flashtune-job-{job_id}-{uuid.uuid4().hex[:8]}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


class RankStopped(Exception):
    """A rank ended without success: exiting non-zero makes torchrun stop the other ranks at once."""


def rank_main(
    settings: Settings,
    job_id: int,
    worker_id: str,
    spec: TrainingSpec,
    run_dir: str,
    launcher_pid: int,
    attempt: int | None = None,
) -> None:
    """One rank of a multi-GPU attempt (started by ``workers.training.distributed.launch``): train, then report to a
    file."""
    logs.configure(json_lines=settings.log_json)  # like the child: a spawned rank starts without logging set up
    dist = distributed.init_rank(pick_device(settings.device), launcher_pid)
    with logs.bind_job(job_id):
        outcome = run_attempt(settings, job_id, worker_id, dist, spec, attempt)
    distributed.write_outcome(Path(run_dir), dist.rank, outcome)
    if outcome.status != "succeeded":
        message = (outcome.error or {}).get("message") or ""
        raise RankStopped(f"rank {dist.rank} of {dist.world}: {outcome.status} {message}".strip())
    distributed.close_rank()
