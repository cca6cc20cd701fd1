"""Client commands of ``flashtune``: talk to a running API by URL and key (typer + rich).

    flashtune jobs submit|list|show|watch|events|cancel     flashtune datasets upload|list|show
    flashtune adapters list|show|download|alias|aliases|promote   flashtune workers   flashtune analyze "text"

Tables for people, ``--json`` for scripts. ``jobs watch`` (and ``jobs submit --watch``) follows a job until it
ends: a live progress bar on a terminal, plain lines otherwise (a log file, CI), with the wait for a worker and
the model build shown as phases. Exit codes: 0 done; 1 the API refused, the server is unreachable, or the watched
job failed or was cancelled (its error and hint printed); 2 a bad option, JSON value or file (usage error); 130
interrupted. Errors are one line on stderr, never a traceback. The server comes from ``--url`` /
``FLASHTUNE_URL``, the key from ``--api-key`` / ``FLASHTUNE_API_KEY``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

FINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"
POLL_SECONDS = 0.5
NOTICE_EVERY = 30.0  # seconds between repeats of the no-worker notice while a watched job waits

Url = Annotated[str, typer.Option("--url", envvar="FLASHTUNE_URL", help="The FlashTune API.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="FLASHTUNE_API_KEY", help="Bearer key.", show_default=False)
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output (the API's own JSON).")]


# --------------------------------------------------------------------------------------------------- output
def console(stderr: bool = False) -> Console:
    """A console on stdout or stderr: colours and live bars on a terminal; elsewhere plain text, never wrapped."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 1000, highlight=False, soft_wrap=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line (or a few) on stderr and the exit code: no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def say(message: str) -> None:
    """A line for the person on stderr (stdout stays the command's result)."""
    typer.echo(message, err=True)


def bad_option(option: str, message: str) -> NoReturn:
    """A usage error naming the option (click prints it with the usage line; exit 2)."""
    raise typer.BadParameter(message, param_hint=f"'{option}'")


def json_object(value: str | None, option: str) -> dict[str, Any] | None:
    """The JSON object an option holds (``@file`` reads it from a file); a usage error naming the option if not."""
    if value is None:
        return None
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            bad_option(option, f"cannot read {value[1:]}: {exc.strerror}")
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        bad_option(option, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
    if not isinstance(data, dict):
        bad_option(option, "must be a JSON object, e.g. '{\"epochs\": 2}'")
    return data


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d")


def when(value: str) -> str:
    """An API timestamp (UTC, with or without a zone) in local time."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def cell(value: Any) -> str:
    """A value as a person reads it in a table: no Python reprs (None, dicts, lists, ISO timestamps)."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, str) and ISO_TIME.match(value):
        return when(value)
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Rows as a table on stdout; ``columns`` are (key, header)."""
    grid = Table(box=None, header_style="bold", pad_edge=False)
    for _, header in columns:
        grid.add_column(header)
    for row in rows:
        grid.add_row(*(Text(cell(row.get(key))) for key, _ in columns))
    show(grid)


def pairs(items: list[tuple[str, Any]]) -> None:
    """Name-value lines on stdout (``show`` commands)."""
    grid = Table(box=None, show_header=False, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in items:
        grid.add_row(Text(name), Text(cell(value)))
    show(grid)


def show(renderable: Table) -> None:
    """Print on stdout: as rich draws it on a terminal; elsewhere without the padding after each line's end."""
    out = console()
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


# ----------------------------------------------------------------------------------------------------- HTTP
def unreachable(url: str, exc: Exception) -> str:
    reason = str(exc).split("] ")[-1].strip() or type(exc).__name__
    return (
        f"cannot reach the FlashTune API at {url} ({reason}): start it with `flashtune serve`, "
        "or point --url / FLASHTUNE_URL at a running one"
    )


def api_error(response: httpx.Response) -> str:
    """The API's error body (``{"error": {"type", "message", "details"}}``) as a few lines."""
    try:
        error = response.json()["error"]
        head = f"{response.status_code} {error.get('type', 'error')}: {error['message']}"
        details = error.get("details")
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}: {response.text[:300]}"
    lines = [head]
    if isinstance(details, list):
        for item in details[:10]:
            if isinstance(item, dict) and "message" in item:
                where = item.get("field") or item.get("line") or item.get("column") or ""
                lines.append(f"  {where}: {item['message']}" if where else f"  {item['message']}")
            else:
                lines.append(f"  {cell(item)}")
    elif details:
        lines.append(f"  {cell(details)}")
    if response.status_code == 401:
        lines.append("  pass --api-key or set FLASHTUNE_API_KEY")
    return "\n".join(lines)


class Api:
    """The API at ``url``: every failure becomes one line and exit 1 (``fail``)."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 120) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self.client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10))
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            fail(f"--url / FLASHTUNE_URL {url!r} is not a URL: {exc}")

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.close()

    def request(self, method: str, path: str, check: bool = True, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            fail(unreachable(self.url, exc))
        except httpx.TimeoutException:
            fail(f"the FlashTune API at {self.url} did not answer {method} {path} in time")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            fail(f"--url / FLASHTUNE_URL {self.url!r} is not an http(s) URL ({exc})")
        except httpx.TransportError as exc:
            fail(f"talking to the FlashTune API at {self.url} failed: {exc}")
        if check and response.status_code >= 400:
            fail(api_error(response))
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            fail(f"{self.url}{path} answered without JSON: is {self.url} a FlashTune API?")

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None} or None)

    def worker_notice(self) -> str | None:
        """``/readyz``'s notice when jobs wait and no worker is alive (None from a server that has none)."""
        response = self.request("GET", "/readyz", check=False)
        try:
            return response.json().get("workers", {}).get("notice")
        except (ValueError, AttributeError):
            return None

    @contextmanager
    def stream(self, path: str) -> Iterator[httpx.Response]:
        try:
            with self.client.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    fail(api_error(response))
                yield response
        except httpx.ConnectError as exc:
            fail(unreachable(self.url, exc))
        except httpx.TransportError as exc:
            fail(f"talking to the FlashTune API at {self.url} failed: {exc}")


# ---------------------------------------------------------------------------------------------- following
# What a job does before its first step, by its newest event (workers/child.py, workers/training/recipe.py).
LOADING = {
    "started": "preparing: reading the dataset, finding the base model",
    "distributed": "starting the training processes",
    "setup": "loading the base model",
}
STARTING = {
    "base_cache": "starting training",
    "dataset": "starting training",
    "cuda_plan": "starting training",
    "resumed": "resuming from a checkpoint",
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


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def report_end(job: dict[str, Any]) -> int:
    """Say on stderr how a followed job ended; the exit code: 0 succeeded, 1 failed or cancelled."""
    took = duration(_seconds_between(job.get("created_at"), job.get("finished_at")))
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


# ----------------------------------------------------------------------------------------------------- jobs
jobs_app = typer.Typer(help="Submit, list, show, watch, cancel jobs; read their events.")
JOB_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("status", "STATUS"),
    ("dataset", "DATASET"),
    ("step", "STEP"),
    ("loss", "LOSS"),
    ("adapter", "ADAPTER"),
    ("created_at", "CREATED"),
]


def job_row(job: dict[str, Any]) -> dict[str, Any]:
    progress = job.get("progress") or {}
    total = progress.get("total_steps") or 0
    step = f"{progress.get('step') or 0}/{total}" if total else None
    loss = progress.get("loss")
    return {**job, "step": step, "loss": None if loss is None else f"{loss:.4f}"}


def show_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(job)
    else:
        table([job_row(job)], JOB_COLUMNS)


def warn_if_no_worker(api: Api) -> None:
    text = api.worker_notice()
    if text:
        say(f"warning: {text}")


def finish_watch(api: Api, job_id: int, as_json: bool) -> None:
    job = follow(api, job_id)
    show_job(job, as_json)
    code = report_end(job)
    if code:
        raise typer.Exit(code)


@jobs_app.command("submit")
def jobs_submit(
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    dataset: Annotated[str, typer.Option(help="'builtin' or a dataset id (ds-...).")] = "builtin",
    name: Annotated[str | None, typer.Option(help="A name for the job.", show_default=False)] = None,
    base_model: Annotated[str | None, typer.Option(help="Default: the server's.", show_default=False)] = None,
    hyperparameters: Annotated[
        str | None,
        typer.Option(help="JSON object, e.g. '{\"epochs\": 2}', or @file.json.", show_default=False),
    ] = None,
    promote_to: Annotated[
        str | None,
        typer.Option(help="An alias (e.g. production) to move to the adapter if it beats the current one."),
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job until it ends; exit 1 unless it succeeds.")] = (
        False
    ),
) -> None:
    """Queue a training job."""
    body: dict[str, Any] = {"dataset": dataset, "hyperparameters": json_object(hyperparameters, "--hyperparameters")}
    if body["hyperparameters"] is None:
        del body["hyperparameters"]
    body.update({k: v for k, v in (("name", name), ("base_model", base_model), ("promote_to", promote_to)) if v})
    with Api(url, api_key) as api:
        job = api.call("POST", "/jobs", json=body)
        say(f"queued job {job['id']}")
        if watch:
            finish_watch(api, job["id"], as_json)
            return
        show_job(job, as_json)
        warn_if_no_worker(api)


@jobs_app.command("list")
def jobs_list(
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
) -> None:
    """List jobs, newest first."""
    with Api(url, api_key) as api:
        page = api.get("/jobs", limit=limit, status=status)
        if as_json:
            print_json(page["data"])
            return
        table([job_row(j) for j in page["data"]], JOB_COLUMNS)
        if any(j["status"] == "queued" for j in page["data"]):
            warn_if_no_worker(api)


def job_pairs(job: dict[str, Any]) -> list[tuple[str, Any]]:
    progress, error = job.get("progress") or {}, job.get("error") or {}
    row = job_row(job)
    items: list[tuple[str, Any]] = [
        ("id", job["id"]),
        ("name", job.get("name")),
        ("status", job["status"]),
        ("base model", job.get("base_model")),
        ("dataset", job.get("dataset")),
        ("hyperparameters", job.get("hyperparameters")),
        ("step", row["step"]),
        ("progress", step_detail(progress) if progress.get("total_steps") else None),
        ("attempts", f"{job.get('attempts', 0)} of {job.get('max_attempts', 0)}"),
        ("error", f"{error.get('type')}: {error.get('message')}" if error else None),
        ("hint", error.get("hint")),
        ("adapter", job.get("adapter")),
    ]
    if job.get("promote_to") or job.get("promotion"):
        items.append(("promotion", promotion_text(job.get("promotion")) or f"to {job['promote_to']}, pending"))
    took = _seconds_between(job.get("started_at"), job.get("finished_at"))
    items += [
        ("created", job.get("created_at")),
        ("started", job.get("started_at")),
        ("finished", job.get("finished_at")),
        ("ran for", duration(took) if took is not None else None),
    ]
    return items


JobId = Annotated[int, typer.Argument(help="The job's id.", min=0)]


@jobs_app.command("show")
def jobs_show(job_id: JobId, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Show a job. Status, progress, error and hint, adapter."""
    with Api(url, api_key) as api:
        job = api.get(f"/jobs/{job_id}")
        if as_json:
            print_json(job)
            return
        pairs(job_pairs(job))
        if job["status"] == "queued":
            warn_if_no_worker(api)


@jobs_app.command("watch")
def jobs_watch(job_id: JobId, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Follow a job until it ends. Exit 1 if it failed or was cancelled."""
    with Api(url, api_key) as api:
        finish_watch(api, job_id, as_json)


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobId, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Cancel a queued or running job. A running one stops after its current step."""
    with Api(url, api_key) as api:
        show_job(api.call("POST", f"/jobs/{job_id}/cancel"), as_json)


@jobs_app.command("events")
def jobs_events(
    job_id: JobId,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per event (the API's).")] = False,
    after: Annotated[int, typer.Option(help="Only events after this event id.", min=0)] = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until the job ends.")] = (
        False
    ),
) -> None:
    """Print a job's events. Queued, started, setup, epochs, checkpoints, evaluation, outcome."""
    ended = False
    with Api(url, api_key) as api:
        while True:
            page = api.get(f"/jobs/{job_id}/events", after=after, limit=limit)
            for event in page["data"]:
                typer.echo(json.dumps(event, ensure_ascii=False) if as_json else event_row(event))
                after = event["id"]
            if not follow_:
                if page["has_more"]:
                    say(f"more: --after {after}")
                return
            if page["has_more"]:
                continue
            if ended:  # the events written up to the end are printed
                return
            ended = api.get(f"/jobs/{job_id}")["status"] in FINAL
            if not ended:
                time.sleep(POLL_SECONDS)


def event_row(event: dict[str, Any]) -> str:
    return f"{event['id']:>6}  {when(event['created_at'])}  {event['level']:<7} {event['type']:<11} {event['message']}"


# ------------------------------------------------------------------------------------------------- datasets
datasets_app = typer.Typer(help="Upload, list and show datasets.")
DATASET_COLUMNS = [
    ("id", "ID"),
    ("format", "FORMAT"),
    ("num_examples", "EXAMPLES"),
    ("num_validation", "VALIDATION"),
    ("label_distribution", "LABELS"),
    ("rejected_count", "REJECTED"),
    ("filename", "FILE"),
    ("created_at", "CREATED"),
]


def show_dataset(dataset: dict[str, Any]) -> None:
    pairs(
        [(key.replace("_", " "), dataset.get(key)) for key, _ in DATASET_COLUMNS[:-1]]
        + [
            ("input fields", dataset.get("input_fields")),
            ("duplicates removed", dataset.get("duplicates_removed")),
            ("unlabelled", dataset.get("unlabelled")),
            ("options", dataset.get("options")),
            ("details", dataset.get("details")),
            ("created", dataset.get("created_at")),
        ]
    )
    for item in (dataset.get("rejected") or [])[:10]:
        say(f"rejected: {cell(item)}")


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, metavar="FILE", help="The file to upload.")
    ],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    format: Annotated[str | None, typer.Option(help="Default: from the file (docs/datasets.md).")] = None,
    options: Annotated[str | None, typer.Option(help="JSON object of importer options, or @file.json.")] = None,
) -> None:
    """Upload a dataset. Instruction or chat JSONL, a labelled CSV, or the finance SQLite database."""
    data: dict[str, str] = {}
    if format:
        data["format"] = format
    parsed = json_object(options, "--options")
    if parsed is not None:
        data["options"] = json.dumps(parsed)
    say(f"uploading {file.name} ({file.stat().st_size:,} bytes)")
    with Api(url, api_key, timeout=600) as api, file.open("rb") as handle:
        dataset = api.call("POST", "/datasets", files={"file": (file.name, handle)}, data=data)
    if as_json:
        print_json(dataset)
    else:
        show_dataset(dataset)


@datasets_app.command("list")
def datasets_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the uploaded datasets."""
    with Api(url, api_key) as api:
        datasets = api.get("/datasets")
    if as_json:
        print_json(datasets)
    else:
        table(datasets, DATASET_COLUMNS)


@datasets_app.command("show")
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(help="ds-...")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Show a dataset. Counts, labels, options, rejected lines."""
    with Api(url, api_key) as api:
        dataset = api.get(f"/datasets/{dataset_id}")
    if as_json:
        print_json(dataset)
    else:
        show_dataset(dataset)


# ------------------------------------------------------------------------------------------------- adapters
adapters_app = typer.Typer(help="List, show, download adapters; point aliases at them.")


def promotion_text(promotion: dict[str, Any] | None) -> str | None:
    """A job's ``promote_to`` and its decision, in a line: "promoted to production: macro-F1 0.61 > ..."."""
    if not promotion:
        return None
    reason = f": {promotion['reason']}" if promotion.get("reason") else ""
    return f"{promotion.get('status')} to {promotion.get('alias')}{reason}"


def scores(metrics: dict[str, Any], name: str) -> str | None:
    """ "base -> adapter" of one held-out metric, or None without an evaluation."""
    base, adapter = (metrics.get("base") or {}).get(name), (metrics.get("adapter") or {}).get(name)
    if adapter is None:
        return None
    return f"{base:.3f} -> {adapter:.3f}" if base is not None else f"{adapter:.3f}"


def adapter_row(adapter: dict[str, Any]) -> dict[str, Any]:
    metrics = adapter.get("metrics") or {}
    return {
        **adapter,
        "accuracy": scores(metrics, "accuracy"),
        "macro_f1": scores(metrics, "macro_f1"),
        "items": metrics.get("num_labelled"),
    }


ADAPTER_COLUMNS = [
    ("name", "NAME"),
    ("aliases", "ALIASES"),
    ("job_id", "JOB"),
    ("base_model", "BASE MODEL"),
    ("dataset", "DATASET"),
    ("accuracy", "ACCURACY base -> adapter"),
    ("macro_f1", "MACRO-F1 base -> adapter"),
    ("items", "HELD-OUT"),
    ("created_at", "CREATED"),
]
AdapterName = Annotated[str, typer.Argument(help="job-<id>, or an alias.")]


@adapters_app.command("list")
def adapters_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List adapters. Their held-out scores next to the base model's."""
    with Api(url, api_key) as api:
        adapters = api.get("/adapters")
    if as_json:
        print_json(adapters)
    else:
        table([adapter_row(a) for a in adapters], ADAPTER_COLUMNS)


@adapters_app.command("show")
def adapters_show(name: AdapterName, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Show an adapter. Its job, scores, durations and files."""
    with Api(url, api_key) as api:
        adapter = api.get(f"/adapters/{name}")
    if as_json:
        print_json(adapter)
        return
    row, metrics = adapter_row(adapter), adapter.get("metrics") or {}
    items = [(header.split(" base")[0].lower(), row.get(key)) for key, header in ADAPTER_COLUMNS]
    items += [
        ("promotion", promotion_text(adapter.get("promotion"))),
        ("input fields", adapter.get("input_fields")),
        ("durations", {k.removesuffix("_seconds"): duration(v) for k, v in (metrics.get("durations") or {}).items()}),
    ]
    pairs(items)
    files = adapter.get("files") or []
    if files:
        typer.echo("")
        table(files, [(key, key.upper()) for key in files[0]])


@adapters_app.command("download")
def adapters_download(
    name: AdapterName,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: ./<name>.tar.gz")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Download an adapter as a .tar.gz. Weights, config and training_info.json."""
    target = output or Path(f"{name}.tar.gz")
    if target.exists() and not force:
        bad_option("--output", f"{target} exists (pass --force to overwrite it)")
    partial = target.with_name(target.name + ".part")
    size = 0
    with (
        Api(url, api_key, timeout=600) as api,
        api.stream(f"/adapters/{name}/download") as response,
        partial.open("wb") as handle,
    ):
        for chunk in response.iter_bytes():
            handle.write(chunk)
            size += len(chunk)
    os.replace(partial, target)
    say(f"wrote {target} ({size:,} bytes)")
    typer.echo(str(target))


def current_target(api: Api, alias: str) -> str | None:
    """The adapter an alias points at now; None when it does not exist yet."""
    response = api.request("GET", f"/aliases/{alias}", check=False)
    return str(response.json().get("adapter")) if response.status_code == 200 else None


def macro_f1(api: Api, adapter: str) -> str:
    return adapter_row(api.get(f"/adapters/{adapter}"))["macro_f1"] or "not evaluated"


Reason = Annotated[str | None, typer.Option(help="Why, recorded in the adapter's job events.", show_default=False)]


@adapters_app.command("alias")
def adapters_alias(
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
    adapter: Annotated[str, typer.Argument(help="The adapter it should name (job-<id>).")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    reason: Reason = None,
) -> None:
    """Point an alias at an adapter. /analyze with {"adapter": ALIAS} is then served by it (PUT /aliases/ALIAS)."""
    body = {"adapter": adapter, **({"reason": reason} if reason else {})}
    with Api(url, api_key) as api:
        previous = current_target(api, alias)
        result = api.call("PUT", f"/aliases/{alias}", json=body)
    say(f"{alias}: {previous or 'unset'} -> {result['adapter']}")
    if as_json:
        print_json(result)


@adapters_app.command("aliases")
def adapters_aliases(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the aliases. Each with its adapter, when and why it was set."""
    with Api(url, api_key) as api:
        rows = api.get("/aliases")
    if as_json:
        print_json(rows)
    else:
        table(rows, [("alias", "ALIAS"), ("adapter", "ADAPTER"), ("updated_at", "SET"), ("reason", "REASON")])


@adapters_app.command("promote")
def adapters_promote(
    adapter: Annotated[str, typer.Argument(help="The adapter to promote (job-<id>).")],
    to: Annotated[str, typer.Option("--to", help="The alias to move.")] = "production",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    reason: Reason = None,
) -> None:
    """Promote an adapter by hand. Moves an alias (production) to it, no gate; prints both macro-F1s."""
    body = {"alias": to, **({"reason": reason} if reason else {})}
    with Api(url, api_key) as api:
        previous = current_target(api, to)
        if previous is not None and previous != adapter:
            say(f"{to} was {previous} (held-out macro-F1 base -> adapter: {macro_f1(api, previous)})")
        say(f"{adapter}: held-out macro-F1 base -> adapter: {macro_f1(api, adapter)}")
        result = api.call("POST", f"/adapters/{adapter}/aliases", json=body)
    say(f"{to}: {previous or 'unset'} -> {result['adapter']}")
    if as_json:
        print_json(result)


# -------------------------------------------------------------------------------------------------- workers
def workers(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the workers. Alive, stopped or lost, and the job each runs."""
    with Api(url, api_key) as api:
        rows = api.get("/workers")
        text = api.worker_notice()
    if as_json:
        print_json(rows)
        return
    for row in rows:
        row["seen"] = f"{duration(row['last_seen_seconds'])} ago"
    columns = [("id", "ID"), ("hostname", "HOST"), ("pid", "PID"), ("state", "STATE"), ("job_id", "JOB")]
    table(rows, [*columns, ("seen", "LAST SEEN"), ("started_at", "STARTED")])
    if text:
        say(f"warning: {text}")
    elif not rows:
        say("no worker has been seen by this database: start one with `flashtune worker`")


# -------------------------------------------------------------------------------------------------- analyze
def analyze(
    text: Annotated[str, typer.Argument(help="The news text.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    adapter: Annotated[
        str | None,
        typer.Option(help="An adapter, an alias (production), 'latest' or 'none'. Default: the server's."),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="0: the label only, no analysis text.", min=0)] = None,
    metadata: Annotated[str | None, typer.Option(help='JSON object, e.g. \'{"star": 4, "actual": "22.4"}\'.')] = None,
    market_context: Annotated[str | None, typer.Option(help='JSON object, e.g. \'{"trend": "down"}\'.')] = None,
) -> None:
    """Analyze a news text. Label, probabilities, importance, reaction, analysis."""
    body: dict[str, Any] = {"text": text}
    extra = {
        "adapter": adapter,
        "max_new_tokens": max_new_tokens,
        "metadata": json_object(metadata, "--metadata"),
        "market_context": json_object(market_context, "--market-context"),
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    with Api(url, api_key) as api:
        result = api.call("POST", "/analyze", json=body)
    if as_json:
        print_json(result)
        return
    probs = "  ".join(f"{k} {v:.2f}" for k, v in (result.get("probs") or {}).items())
    via = f" (alias {result['alias']})" if result.get("alias") else ""
    typer.echo(f"{result['label']} ({result['score']:.2f})   {probs}")
    typer.echo(
        f"importance {cell(result.get('importance'))}  reaction {cell(result.get('market_reaction'))}  "
        f"adapter {cell(result.get('adapter'))}{via}"
    )
    if result.get("analysis"):
        typer.echo(result["analysis"])


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``flashtune`` app."""
    app.add_typer(jobs_app, name="jobs", no_args_is_help=True)
    app.add_typer(datasets_app, name="datasets", no_args_is_help=True)
    app.add_typer(adapters_app, name="adapters", no_args_is_help=True)
    app.command("workers")(workers)
    app.command("analyze")(analyze)
