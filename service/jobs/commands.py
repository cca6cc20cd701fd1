"""The job domain's use cases: what the API routes compose (queue, show and cancel jobs; look up, pack and delete
adapters; look up datasets).

Each is a small keyword-only function over a session and the settings; it refuses a request by raising
``service.core.errors.RequestError`` (the API renders it) and changes a job only through ``service.jobs.jobstore``
(the state machine's one owner) and its files only through ``service.core.layout`` (the DATA_DIR contract).
No HTTP here: the routes hold the request and response shapes, these functions hold the rules. Uploads are
``service.datasets.store.save_upload``'s: the dataset store sits above the job domain.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service.core.config import Settings
from service.core.errors import RequestError, not_found
from service.core.layout import AdapterRef, adapter_job_id, checkpoint_step, complete_checkpoints
from service.core.training_info import read_training_info
from service.jobs import aliases, jobstore
from service.jobs.hyperparameters import resolve
from service.jobs.models import BUILTIN_DATASET, Dataset, Job, JobCreate, JobStatus
from service.llm.modeling import (
    BaseModelRejected,
    ModelLoadError,
    has_chat_template,
    local_base_source,
    public_base_name,
    validate_base_model,
)


# ------------------------------------------------------------------------------------------------------- jobs
def queue_job(
    *, session: Session, settings: Settings, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Validate and queue a job (committed before returning); ``(job, True)`` replays an Idempotency-Key.

    ``POST /jobs`` and ``POST /v1/fine_tuning/jobs`` both queue through here, so both get the same checks."""
    request_hash = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        existing = jobstore.find_by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash), True
    _check_queue(session=session, settings=settings)
    if not dataset_exists(session=session, dataset_id=body.dataset):
        raise RequestError(
            422,
            "invalid_request",
            f"dataset {body.dataset!r} does not exist",
            [{"field": "dataset", "message": "use 'builtin' or an id from GET /datasets"}],
        )
    held_out = body.hyperparameters.validation_dataset
    if held_out is not None and not dataset_exists(session=session, dataset_id=held_out):
        raise RequestError(
            422,
            "invalid_request",
            f"validation dataset {held_out!r} does not exist",
            [{"field": "hyperparameters.validation_dataset", "message": "an id from GET /datasets"}],
        )
    base_model = _base_model(settings, body.base_model)
    hyperparameters = resolve(body.hyperparameters, base_model)
    if hyperparameters.prompt_format == "chat_template":
        _check_chat_template(settings, base_model)
    job = Job(
        name=body.name,
        base_model=base_model,
        dataset=body.dataset,
        hyperparameters=hyperparameters.model_dump(),
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    try:
        with session.begin_nested():
            jobstore.create(session, job)
            if body.promote_to:
                assert job.id is not None
                aliases.request_promotion(session, job.id, body.promote_to)
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        existing = jobstore.find_by_idempotency_key(session, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, request_hash), True
    session.commit()  # visible before the 201 goes out
    return job, False


def _check_queue(*, session: Session, settings: Settings) -> None:
    """A bound on what one caller can pile up ahead of everyone else."""
    queued = jobstore.count_queued(session)
    if queued >= settings.max_queued_jobs:
        raise RequestError(
            429,
            "queue_full",
            f"{queued} jobs are already queued (the limit is "
            f"{settings.max_queued_jobs}); wait for some to finish or cancel some",
        )


def _base_model(settings: Settings, requested: str | None) -> str:
    """The job's base model: the served one unless named; a local path must stay under an allowed root."""
    try:
        return validate_base_model(requested or settings.base_model, settings)
    except BaseModelRejected as exc:
        details = [{"field": "base_model", "message": str(exc)}]
        raise RequestError(422, "invalid_request", f"base_model: {exc}", details) from exc


def _check_chat_template(settings: Settings, base_model: str) -> None:
    """Refuse (422) ``prompt_format`` ``chat_template`` for a base whose tokenizer has no chat template, where this
    host has the base's files already (the built-in model once built, a local folder): a job that could only fail
    at its worker's setup. A hub id is left to the worker, which refuses it the same way (workers/training/recipe.py):
    the API downloads no model to queue a job."""
    try:
        source = local_base_source(base_model, settings)
        templated = source is None or has_chat_template(source)
    except ModelLoadError:  # no tokenizer to read here: the worker's load says why
        return
    if not templated:
        raise RequestError(
            422,
            "invalid_request",
            "hyperparameters.prompt_format: 'chat_template' needs a base model whose tokenizer has a chat template; "
            f"base model {public_base_name(base_model)!r} has none",
            [{"field": "hyperparameters.prompt_format", "message": "use 'flashtune' (the default) or a chat model"}],
        )


def _replay(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise RequestError(
            422,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request body",
            [{"field": "Idempotency-Key", "message": f"already used for job {job.id}"}],
        )
    return job


def get_job(*, session: Session, job_id: int) -> Job:
    job = jobstore.get(session, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def cancel_job(*, session: Session, job_id: int, shown: str | None = None) -> Job:
    """Cancel a queued or running job (committed); 409 for any other. ``shown``: the id the caller knows it by."""
    job = get_job(session=session, job_id=job_id)
    try:
        cancelled = jobstore.cancel(session, job_id)
    except jobstore.TransitionError as exc:
        raise RequestError(
            409, "conflict", f"job {shown or job_id} is {job.status}; only queued or running jobs can be cancelled"
        ) from exc
    session.commit()
    return cancelled


def checkpoint_steps(*, settings: Settings, job_id: int) -> list[tuple[int, int]]:
    """``(step, created_at)`` of a job's complete checkpoints, newest first."""
    paths = reversed(complete_checkpoints(settings.layout.job_dir(job_id)))
    return [(checkpoint_step(path), int(path.stat().st_mtime)) for path in paths]


# --------------------------------------------------------------------------------------------------- datasets
def dataset_exists(*, session: Session, dataset_id: str) -> bool:
    return dataset_id == BUILTIN_DATASET or session.get(Dataset, dataset_id) is not None


def get_dataset(*, session: Session, dataset_id: str, what: str = "dataset") -> Dataset:
    """The dataset ``dataset_id``; a 404 calling it ``what`` (the OpenAI routes know datasets as files)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found(what, dataset_id)
    return dataset


def list_datasets(*, session: Session) -> list[Dataset]:
    """Newest first."""
    return list(session.exec(select(Dataset).order_by(col(Dataset.created_at).desc())).all())


def dataset_page(
    *, session: Session, after: str | None, limit: int, newest_first: bool = True
) -> tuple[list[Dataset], bool]:
    """A page of datasets by upload time (then id) and whether more follow; ``after``: the id of the last dataset of
    the previous page (422 naming ``after`` when there is no such dataset)."""
    created, ident = col(Dataset.created_at), col(Dataset.id)
    query = select(Dataset).order_by(*((created.desc(), ident.desc()) if newest_first else (created, ident)))
    if after is not None:
        anchor = session.get(Dataset, after)
        if anchor is None:
            raise RequestError(404, "not_found", f"after: no file {after[:64]!r}", [{"field": "after"}])
        if newest_first:
            beyond = or_(created < anchor.created_at, and_(created == anchor.created_at, ident < anchor.id))
        else:
            beyond = or_(created > anchor.created_at, and_(created == anchor.created_at, ident > anchor.id))
        query = query.where(beyond)
    rows = list(session.exec(query.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def delete_dataset(*, session: Session, settings: Settings, dataset_id: str) -> None:
    """Remove a dataset and its stored files (committed); 409 while a queued or running job trains or validates on
    it, or for the built-in one; 404 when there is none."""
    if dataset_id == BUILTIN_DATASET:
        raise RequestError(409, "conflict", "the built-in dataset cannot be deleted")
    dataset = get_dataset(session=session, dataset_id=dataset_id, what="file")
    active = session.exec(select(Job).where(col(Job.status).in_([JobStatus.queued, JobStatus.running]))).all()
    using = [job.id for job in active if dataset_id in (job.dataset, job.hyperparameters.get("validation_dataset"))]
    if using:
        shown = ", ".join(str(i) for i in using[:10])
        message = f"{dataset_id} is used by queued or running jobs ({shown}): cancel them first"
        raise RequestError(409, "conflict", message)
    session.delete(dataset)
    session.commit()
    shutil.rmtree(settings.layout.datasets / dataset_id, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- adapters
def adapter_job(*, session: Session, name: str) -> Job:
    """The succeeded job that produced adapter ``name``; 404 when none did (or it was deleted), 409 when its job
    has not succeeded (yet)."""
    job_id = adapter_job_id(name)
    job = jobstore.get(session, job_id) if job_id is not None else None
    if job is None or (job.status == JobStatus.succeeded and job.adapter is None):  # never made, or deleted
        raise not_found("adapter", name)
    if job.status != JobStatus.succeeded or job.adapter != name:
        raise RequestError(409, "adapter_unavailable", f"adapter {name} has no model: its job is {job.status}")
    return job


@dataclass(frozen=True)
class Served:
    """What a request's adapter name resolved to: the adapter (None: the base alone) and the alias it came through
    ('latest' or a named alias; None when the request named the adapter itself or 'none')."""

    adapter: AdapterRef | None
    alias: str | None


def resolve_adapter(*, session: Session, settings: Settings, name: str) -> AdapterRef | None:
    """The adapter a request names (see :func:`resolve_served`)."""
    return resolve_served(session=session, settings=settings, name=name).adapter


def resolve_served(*, session: Session, settings: Settings, name: str) -> Served:
    """The adapter a request names: 'none' is the base alone (None); 'latest' the newest succeeded adapter on the
    served base that has a held-out evaluation; an alias (``production``) the adapter it points at now; else an
    adapter name. The adapter must have been trained on the served base."""
    if name == "none":
        return Served(None, None)
    alias: str | None = None
    if name == "latest":
        latest = aliases.latest_evaluated(session, settings)
        if latest is None or latest.adapter is None:
            raise RequestError(
                404,
                "no_adapter",
                "no adapter with a held-out evaluation has been trained on this base model yet; use adapter "
                "'none' for the base model, or queue a job with POST /jobs",
            )
        alias, name = "latest", latest.adapter
    elif adapter_job_id(name) is None:
        row = aliases.get(session, name)
        if row is None:
            raise RequestError(
                404,
                "not_found",
                f"no alias or adapter is named {name[:64]!r}; GET /aliases and GET /adapters list them",
                [{"field": "adapter", "message": "an alias, an adapter name (job-<id>), 'latest' or 'none'"}],
            )
        alias, name = row.name, row.adapter
    return Served(_served_adapter(session=session, settings=settings, name=name), alias)


def _served_adapter(*, session: Session, settings: Settings, name: str) -> AdapterRef:
    job = adapter_job(session=session, name=name)
    if job.base_model != settings.base_model:
        raise RequestError(
            409,
            "base_model_mismatch",
            f"adapter {name} was trained on {job.base_model!r}; this server serves {settings.base_model!r}",
        )
    return settings.layout.adapter(name)


def adapter_contents(*, settings: Settings, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The files of a published adapter (name and size) and its ``training_info.json``."""
    folder = settings.layout.adapter_dir(name)
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(folder.iterdir())] if folder.exists() else []
    return files, read_training_info(folder)


def pack_adapter(*, session: Session, settings: Settings, name: str) -> io.BytesIO:
    """The adapter folder as a tar.gz (its plain files, under ``<name>/``)."""
    adapter_job(session=session, name=name)
    folder = settings.layout.adapter_dir(name)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=f"{name}/{path.name}")
    buffer.seek(0)
    return buffer


def delete_adapter(*, session: Session, settings: Settings, name: str, unload: Callable[[str], None]) -> None:
    """Stop serving an adapter and remove its files; its job stays, succeeded, with ``adapter: null``.

    The detach is committed first, so from then on no request resolves the name; ``unload`` (the model server's)
    then drops it from memory, and only then do its files go."""
    job = adapter_job(session=session, name=name)
    assert job.id is not None
    pointing = aliases.names_for(session, name)
    if pointing:
        raise RequestError(
            409,
            "adapter_aliased",
            f"adapter {name} is what {', '.join(pointing)} serve; point them elsewhere (PUT /aliases/<alias>) or "
            "delete them (DELETE /aliases/<alias>) first",
        )
    jobstore.delete_adapter(session, job.id, name)
    session.commit()
    unload(name)
    shutil.rmtree(settings.layout.adapter_dir(name), ignore_errors=True)
