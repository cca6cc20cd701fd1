"""The worker: claim a job, run it in a child process, heartbeat while it runs, record how it ended.

    start-up sweep of stalled jobs
    loop: sweep now and then; claim the oldest queued job; run it (child process + heartbeats); decide; repeat

Each job attempt runs in a child process of its own, forked from a fork server that has imported torch,
transformers and FlashTune once (``workers.preload``; ``FLASHTUNE_JOB_PROCESS_START=spawn``: a fresh interpreter
per job, as before).

SIGTERM/SIGINT: the running child checkpoints and stops, the job is requeued, and the worker exits.

The worker alone extends its job's lease (``jobstore.heartbeat``, every ``HEARTBEAT_SECONDS``); the child dies with
it (``workers.child.die_with_worker``: the kernel's parent-death signal, and a pipe only the worker holds open), so
kill -9 of the worker leaves no attempt running, and the job is taken over once the lease expires. Before an
attempt's outcome is recorded the worker makes sure its process is gone (``_reap``): the result pipe reaches EOF
only once every process holding its write end has exited, also when the fork server died and could not report.

A job's checkpoints are removed by the worker, once the transaction that records the job's success has committed
(``_record``), never by the attempt that publishes the adapter: until then a takeover (this worker died, or could not
reach the database) resumes from them instead of training again from step 0. A succeeded job never runs again, so
nothing can write a checkpoint after that commit; checkpoints left by a worker that died right after it are removed
when a worker starts (``clear_finished_checkpoints``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
import uuid
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from service.core import logs
from service.core.config import Settings
from service.core.layout import checkpoints_dir
from service.jobs import aliases, jobstore
from service.jobs import workers as presence
from service.jobs.db import init_db, make_engine, session_scope
from service.jobs.hyperparameters import ResolvedHyperparameters
from service.jobs.models import Job
from service.llm.modeling import ModelLoadError, pick_device
from workers.child import child_main
from workers.retry import Decision, Outcome, decide
from workers.training import checkpoints
from workers.training.distributed import resolve_world_size

log = logging.getLogger("flashtune.worker")
CHILD_STOP_GRACE_SECONDS = 60.0
REAP_SECONDS = 5.0  # how long a child whose exit was reported may hold its result pipe open before it is killed


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.engine: Engine = make_engine(settings.resolved_database_url)
        self.stopping = False
        self.last_sweep = 0.0
        self.context: ForkServerContext | SpawnContext | None = None  # how job processes start: set by run()

    # -------------------------------------------------------------------------------------------- main loop
    def run(self, max_jobs: int | None = None) -> None:
        self._use_gpus()
        self.settings.ensure_dirs()
        init_db(self.engine)
        presence.start_heartbeat(self.engine, self.worker_id, self.settings.heartbeat_seconds)  # GET /workers
        self.context = job_process_context(self.settings.job_process_start)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        log.info("worker %s started (database %s)", self.worker_id, self.engine.url.render_as_string())
        self.sweep(force=True)  # jobs of workers that died while nobody was running
        self.clear_finished_checkpoints()  # of a worker that died between a success and removing its checkpoints
        done = 0
        while not self.stopping and (max_jobs is None or done < max_jobs):
            try:
                self.sweep()
                with session_scope(self.engine) as session:
                    job = jobstore.claim_next(session, self.worker_id)
            except DBAPIError as exc:  # database restarting or unreachable: wait, the queue is still there
                log.warning("database error while claiming (retrying): %s", exc)
                job = None
            if job is None:
                time.sleep(self.settings.poll_seconds)
                continue
            with logs.bind_job(job.id):  # the job's id on every log record while it runs (FLASHTUNE_LOG_JSON)
                self.run_job(job)
            done += 1
        log.info("worker %s stopped", self.worker_id)

    def _use_gpus(self) -> None:
        """``--gpu``: the GPUs this worker's jobs see; ``--gpus``: how many processes train one job (checked here)."""
        if self.settings.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.settings.gpu  # inherited by every training process
        if self.settings.gpus != "1":
            try:
                world = resolve_world_size(self.settings.gpus, pick_device(self.settings.device))
            except (ValueError, ModelLoadError) as exc:
                raise SystemExit(f"flashtune worker: {exc}") from exc
            log.info("each job trains data parallel over %d processes (torchrun)", world)

    def _request_stop(self, signum: int, _frame: Any) -> None:
        log.info("signal %d: checkpointing the running job and stopping", signum)
        self.stopping = True

    def sweep(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_sweep < self.settings.lease_seconds / 2:
            return
        self.last_sweep = time.monotonic()
        with session_scope(self.engine) as session:
            moved = jobstore.requeue_stale(session, self.settings.lease_seconds)
        if moved:
            log.warning("requeued stalled jobs %s", moved)

    def clear_finished_checkpoints(self) -> None:
        """Remove the checkpoints left beside succeeded jobs (see the module); an unreadable folder is logged."""
        try:
            with session_scope(self.engine, read_only=True) as session:
                done = [job.id for job in jobstore.succeeded_jobs(session) if job.id is not None]
        except DBAPIError as exc:
            log.warning("could not list succeeded jobs to clear their checkpoints: %s", exc)
            return
        for job_id in done:
            if checkpoints_dir(self.settings.layout.job_dir(job_id)).exists():
                self._remove_checkpoints(job_id)

    def _remove_checkpoints(self, job_id: int) -> None:
        """Remove a succeeded job's checkpoints (no fence: no attempt of a succeeded job can write one)."""
        try:
            checkpoints.prune(self.settings.layout.job_dir(job_id), keep=0)
        except OSError as exc:  # the job has succeeded all the same; a later start-up tries again
            log.warning("job %s: could not remove its checkpoints: %s", job_id, exc)

    # -------------------------------------------------------------------------------------------- one job
    def run_job(self, job: Job) -> None:
        assert job.id is not None
        log.info("running job %s (attempt %d)", job.id, job.attempts)
        if self.context is None:  # run_job called without run()
            self.context = job_process_context(self.settings.job_process_start)
        context = self.context
        receiver, sender = context.Pipe(duplex=False)
        watched, lifeline = context.Pipe(duplex=False)  # the child waits on ``watched``: EOF when this process dies
        args = (self.settings, job.id, self.worker_id, sender, job.attempts, watched)
        child = context.Process(target=child_main, args=args, name=f"flashtune-job-{job.id}")
        outcome: Outcome | None = None
        lease_lost = False
        try:
            child.start()
            sender.close()
            watched.close()
            lease_lost = self._supervise(job, child)
            outcome = _reap(child, receiver)
        except Exception:
            log.exception("supervising job %s failed", job.id)
        finally:
            self._stop_child(child)
            receiver.close()
            lifeline.close()
        if lease_lost or (outcome is not None and outcome.status == "lease_lost"):
            log.warning("job %s: lease lost (cancelled or taken over); nothing recorded", job.id)
            return
        if outcome is None:
            outcome = Outcome(
                "crashed",
                {
                    "type": "worker_lost",
                    "message": _exit_reason(child.exitcode),
                    "hint": "the job is retried; if it keeps crashing, lower batch_size or max_length",
                },
            )
        self._record(job, outcome)

    def _supervise(self, job: Job, child: Any) -> bool:
        """Heartbeat until the child exits; forward a stop request. Returns True when the lease was lost."""
        assert job.id is not None
        job_id, stop_sent = job.id, False
        while child.is_alive():
            child.join(self.settings.heartbeat_seconds)
            try:
                with session_scope(self.engine) as session:
                    jobstore.heartbeat(session, job_id, self.worker_id, job.attempts)
                self.sweep()  # other workers' stalled jobs are requeued even while every worker is busy
            except jobstore.LeaseLost:
                # SIGKILL, not SIGTERM: SIGTERM means "checkpoint and stop", and a stale attempt must write nothing.
                _kill(child)
                return True
            except DBAPIError as exc:  # a missed heartbeat is fine; the lease covers several of them
                log.warning("job %s: heartbeat failed (retrying): %s", job_id, exc)
            if self.stopping and not stop_sent:
                child.terminate()  # SIGTERM: the child checkpoints after its current step and exits
                stop_sent = True
        return False

    def _stop_child(self, child: Any) -> None:
        if child.is_alive():
            child.join(CHILD_STOP_GRACE_SECONDS)
        if child.is_alive():
            _kill(child)
            child.join()

    def _record(self, job: Job, outcome: Outcome) -> None:
        assert job.id is not None
        hp = ResolvedHyperparameters.model_validate(job.hyperparameters)
        decision: Decision = decide(outcome, job.attempts, job.max_attempts, hp.micro_batch_size)
        committed = False
        try:
            with session_scope(self.engine) as session:
                held = (session, job.id, self.worker_id)
                if decision.action == "succeed":
                    assert outcome.adapter is not None
                    jobstore.succeed(*held, outcome.adapter, outcome.progress or {}, attempt=job.attempts)
                    aliases.decide(session, self.settings, job.id, outcome.adapter)  # promote_to: the gate
                elif decision.action == "fail":
                    jobstore.fail(*held, decision.error or {}, attempt=job.attempts)
                else:
                    if decision.new_micro_batch is not None:
                        changed = hp.model_copy(
                            update={
                                "micro_batch_size": decision.new_micro_batch,
                                "gradient_accumulation_steps": hp.gradient_accumulation_steps * 2,
                            }
                        )
                        jobstore.update_hyperparameters(*held, changed.model_dump(), attempt=job.attempts)
                    jobstore.retry(*held, decision.error or {}, decision.delay_seconds, attempt=job.attempts)
            committed = True
        except jobstore.LeaseLost:
            log.warning("job %s: lease lost before its outcome (%s) could be recorded", job.id, outcome.status)
        except DBAPIError:  # the job stays running until its lease expires, then the sweep requeues it
            log.exception("job %s: could not record its outcome (%s)", job.id, outcome.status)
        if committed and decision.action == "succeed":  # only now: a takeover before resumes from them
            self._remove_checkpoints(job.id)
        log.info("job %s: %s", job.id, decision.action)


def job_process_context(start: str) -> ForkServerContext | SpawnContext:
    """The multiprocessing context that starts job processes: "forkserver" (preloaded, see ``workers.preload``)
    where a forked process can still use CUDA, else "spawn"."""
    if start == "forkserver":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["workers.preload"])  # imported by the server only, not here as well
        probe = context.Process(target=_cuda_works_in_a_fork, name="flashtune-fork-check")
        probe.start()
        probe.join()
        if probe.exitcode == 0:
            return context
        log.warning(
            "job processes start as fresh interpreters: a process forked from the preloaded fork server "
            "could not use CUDA (exit code %s)",
            probe.exitcode,
        )
    return multiprocessing.get_context("spawn")


def _cuda_works_in_a_fork() -> None:
    """Raise (exit non-zero) if this process, forked from the fork server, cannot use the GPU the machine has."""
    import torch

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")


def _reap(child: Any, receiver: Connection) -> Outcome | None:
    """The outcome the child sent (None if it sent none), once no process holds the result pipe's write end.

    A child whose exit was reported but whose pipe stays open is still running: its fork server died (kill -9)
    and reported it gone without a status. It is killed here, so that it cannot train on while the job is retried.
    """
    outcome: Outcome | None = None
    for grace in (REAP_SECONDS, REAP_SECONDS):
        deadline = time.monotonic() + grace
        while (left := deadline - time.monotonic()) > 0 and receiver.poll(left):
            try:
                outcome = receiver.recv()
            except EOFError:  # every holder of the write end has exited
                return outcome
        log.warning("job process %s outlived its reported exit (%s); killing it", child.pid, child.exitcode)
        _kill_pid(child.pid)
    log.error("job process %s still holds its result pipe after SIGKILL", child.pid)
    return outcome


def _kill(child: Any) -> None:
    """SIGKILL the child and, when it leads a process group (a multi-GPU attempt: torchrun's launcher and its
    ranks, workers/training/distributed.py), that whole group, so that no rank outlives it."""
    _kill_pid(child.pid)
    child.kill()


def _kill_pid(pid: int | None) -> None:
    """SIGKILL ``pid``, and its process group if it leads one."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pid is not None and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the training process did not exit"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        extra = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"the training process was killed by {name}{extra}"
    if exitcode == 255:  # also what a forked process's exit reads as when its fork server is gone
        return "the training process exited with code 255 without a result (or its fork server was killed)"
    return f"the training process exited with code {exitcode} without a result"
