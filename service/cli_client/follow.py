"""Following a job until it ends (``jobs watch``, ``jobs submit --watch``): a live bar on a terminal, plain lines
elsewhere (a log, CI); the phases before the first step (waiting for a worker, loading, evaluating) and the end."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from service.cli_client.http import Api
from service.cli_client.output import console, duration, fail, say, when

FINAL = ("succeeded", "failed", "cancelled")
POLL_SECONDS = 0.5
NOTICE_EVERY = 30.0  # seconds between repeats of the no-worker notice while a watched job waits
# What a job does before its first step, by its newest event (workers/child.py, workers/training/recipe.py).
LOADING = {
    "started": "preparing: reading the dataset, finding the base model",
    "distributed": "starting the training processes",
    "setup": "loading the base model",
}
STARTING = {
    "base_cache": "loading the base model",  # hit, miss or not_applicable: said as the load begins
    "dataset": "starting training",
    "cuda_plan": "starting training",
    "resumed": "resuming from a checkpoint",
    "resume_refused": "starting training from step 0 (the job's checkpoint is another run's)",
}
AFTER_EVALUATION = {"evaluation", "published", "base_cache", "promotion", "alias"}
BUILTIN_NOTE = " (the built-in model is built on its first use, ~30 s)"
LINE_EVERY = 30.0  # seconds between progress lines of a LineView when no 10% mark is passed


def phase(job: dict[str, Any], last_event: str | None) -> str | None:
    """What the job is doing when there is no step to show (waiting, building, loading, evaluating); None while it
    trains, when the progress bar shows steps."""
    status, progress = job["status"], job.get("progress") or {}
    if status == "queued":
        if job.get("attempts"):
            return f"waiting for a worker to retry (attempt {job['attempts'] + 1} of {job['max_attempts']})"
        return "waiting for a worker"
    if status != "running":
        return None
    if last_event in LOADING:  # also on a retry, whose progress is the earlier attempt's until its first step
        note = BUILTIN_NOTE if last_event == "started" and job.get("base_model") == "builtin" else ""
        return LOADING[last_event] + note
    total, step = progress.get("total_steps") or 0, progress.get("step") or 0
    if not total:
        return STARTING.get(last_event or "", "preparing")
    if last_event in AFTER_EVALUATION:
        return "publishing the adapter"
    if step >= total:
        return "evaluating the base model and the adapter on the held-out split"
    return None


def step_detail(progress: dict[str, Any]) -> str:
    parts = [f"epoch {progress.get('epoch') or 0:.2f}/{progress.get('total_epochs') or 0}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("tokens_per_second"):
        parts.append(f"{progress['tokens_per_second']:,.0f} tok/s")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {duration(progress['eta_seconds'])}")
    return "  ".join(parts)


def event_line(event: dict[str, Any]) -> str:
    clock = when(event["created_at"])[-8:]
    return f"{clock}  {event['type']:<11} {event['message']}"


class View(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def event(self, event: dict[str, Any]) -> None: ...
    def notice(self, text: str) -> None: ...
    def update(self, job: dict[str, Any], phase: str | None) -> None: ...


class BarView:
    """On a terminal: a live bar (a pulsing one during phases), events and notices printed above it."""

    def __init__(self, out: Console, job_id: int) -> None:
        self.job_id = job_id
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[steps]}"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=out,
        )
        self.task = self.bar.add_task(f"job {job_id}", total=None, steps="", detail="")

    def start(self) -> None:
        self.bar.start()

    def stop(self) -> None:
        self.bar.stop()

    def event(self, event: dict[str, Any]) -> None:
        style = {"warning": "yellow", "error": "red"}.get(event.get("level", ""), "dim")
        self.bar.console.print(Text(event_line(event), style=style))

    def notice(self, text: str) -> None:
        self.bar.console.print(Text(f"! {text}", style="bold yellow"))

    def update(self, job: dict[str, Any], phase: str | None) -> None:
        progress = job.get("progress") or {}
        total, step = progress.get("total_steps") or 0, progress.get("step") or 0
        if job["status"] in FINAL:  # the bar as far as training got
            description = f"job {self.job_id}: {job['status']}"
            steps = f"step {step}/{total}" if total else ""
            self.bar.update(self.task, description=description, total=total or 1, completed=step if total else 1)
            self.bar.update(self.task, steps=steps, detail="")
        elif phase is not None:  # a pulsing bar; after the last step (evaluating, publishing) that step
            steps = f"step {step}/{total}" if total and step >= total else ""
            description = f"job {self.job_id}: {phase}"
            self.bar.update(self.task, description=description, total=None, completed=0, steps=steps, detail="")
        else:
            self.bar.update(
                self.task,
                description=f"job {self.job_id}: training",
                total=total,
                completed=step,
                steps=f"step {step}/{total}",
                detail=step_detail(progress),
            )


class LineView:
    """Elsewhere (a pipe, a log, CI): one line per event and phase, and a progress line every 10% or 30 s."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.last_phase: str | None = None
        self.last_step: int | None = None
        self.last_decile = -1
        self.last_line = 0.0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def event(self, event: dict[str, Any]) -> None:
        say(event_line(event))

    def notice(self, text: str) -> None:
        say(f"job {self.job_id}: {text}")

    def update(self, job: dict[str, Any], phase: str | None) -> None:
        progress = job.get("progress") or {}
        total, step = progress.get("total_steps") or 0, progress.get("step") or 0
        training = phase is None or (bool(total) and step >= total)  # the last step, then evaluating
        if job["status"] == "running" and total and training and step != self.last_step:
            decile, now = 10 * step // total, time.monotonic()
            if decile != self.last_decile or now - self.last_line >= LINE_EVERY or step >= total:
                say(f"job {self.job_id}: step {step}/{total} ({100 * step // total}%)  {step_detail(progress)}")
                self.last_decile, self.last_line = decile, now
            self.last_step = step
        if phase is not None and phase != self.last_phase:
            say(f"job {self.job_id}: {phase}")
        self.last_phase = phase


class Follower:
    """Polls a job and its new events; asks ``/readyz`` now and then whether a worker is alive while it waits."""

    def __init__(self, api: Api, job_id: int, view: View) -> None:
        self.api, self.job_id, self.view = api, job_id, view
        self.last_event_id = 0
        self.last_type: str | None = None
        self.notice_checked = 0.0
        self.notice_shown = -NOTICE_EVERY

    def poll(self) -> dict[str, Any]:
        job: dict[str, Any] = self.api.get(f"/jobs/{self.job_id}")
        page = self.api.get(f"/jobs/{self.job_id}/events", after=self.last_event_id, limit=1000)
        for event in page["data"]:
            self.view.event(event)
            self.last_event_id, self.last_type = event["id"], event["type"]
        if job["status"] == "queued":
            self._check_workers()
        self.view.update(job, phase(job, self.last_type))
        return job

    def _check_workers(self) -> None:
        now = time.monotonic()
        if now - self.notice_checked < 3 or now - self.notice_shown < NOTICE_EVERY:
            return
        self.notice_checked = now
        text = self.api.worker_notice()
        if text:
            self.view.notice(text)
            self.notice_shown = now


def follow(api: Api, job_id: int, interval: float = POLL_SECONDS) -> dict[str, Any]:
    """Follow a job until it ends, drawing its progress on stderr; returns the job as it ended."""
    err = console(stderr=True)
    view: View = BarView(err, job_id) if err.is_terminal else LineView(job_id)
    follower = Follower(api, job_id, view)
    view.start()
    try:
        while True:
            job = follower.poll()
            if job["status"] in FINAL:
                return job
            time.sleep(interval)
    except KeyboardInterrupt:
        view.stop()
        fail(f"stopped watching job {job_id}; it goes on (`flashtune jobs cancel {job_id}` stops it)", code=130)
    finally:
        view.stop()


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def report_end(job: dict[str, Any]) -> int:
    """Say on stderr how a followed job ended; the exit code: 0 succeeded, 1 failed or cancelled."""
    took = duration(seconds_between(job.get("created_at"), job.get("finished_at")))
    if job["status"] == "succeeded":
        say(f"job {job['id']} succeeded in {took}: adapter {job.get('adapter') or '-'}")
        return 0
    error = job.get("error") or {}
    if job["status"] == "cancelled":
        say(f"job {job['id']} was cancelled after {took}")
    else:
        kind = f" ({error['type']})" if error.get("type") else ""
        say(f"job {job['id']} failed after {took}{kind}: {error.get('message') or 'no error recorded'}")
    if error.get("hint"):
        say(f"hint: {error['hint']}")
    return 1
