"""``flashtune jobs submit|list|show|watch|events|cancel``."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from service.cli_client.adapters import promotion_text
from service.cli_client.follow import FINAL, POLL_SECONDS, follow, report_end, seconds_between, step_detail
from service.cli_client.http import Api
from service.cli_client.options import DEFAULT_URL, ApiKey, AsJson, Url, json_object
from service.cli_client.output import Columns, duration, pairs, print_result, print_rows, say, table, when

jobs_app = typer.Typer(help="Submit, list, show, watch, cancel jobs; read their events.")
JOB_COLUMNS: Columns = [
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
    print_result(job, as_json, lambda job: table([job_row(job)], JOB_COLUMNS))


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
        print_rows(page["data"], JOB_COLUMNS, as_json, row=job_row)
        if not as_json and any(j["status"] == "queued" for j in page["data"]):
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
    took = seconds_between(job.get("started_at"), job.get("finished_at"))
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
        print_result(job, as_json, lambda job: pairs(job_pairs(job)))
        if not as_json and job["status"] == "queued":
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
