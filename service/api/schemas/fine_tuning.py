"""The OpenAI-compatible objects of ``/v1/files`` and ``/v1/fine_tuning/jobs``, built from FlashTune's rows.

Ids map one to one: file ``ds-…`` is the dataset, job ``ftjob-<n>`` is job ``<n>``, event ``ftevent-<n>`` is job
event ``<n>``, file ``ftjob-<n>-results`` is the job's metrics (``step_metrics.csv``, one of its ``result_files``
once it succeeded), and ``fine_tuned_model`` is the adapter name (``job-<n>``) followed by ``:<suffix>`` when the job
was given one; ``/v1/chat/completions`` and ``/v1/models`` accept both. FlashTune's status names are OpenAI's
(queued, running, succeeded, failed, cancelled). The objects are plain dicts, the shape the ``openai`` client reads.

A job request may say ``method: {"type": "supervised", "supervised": {"hyperparameters": {...}}}`` (the same three
hyperparameters as the top-level ``hyperparameters``, which it replaces); another method type, both at once, a
non-empty ``integrations`` or ``metadata``, or any field FlashTune does not know is a 400 that names it.
``validation_file`` is the held-out split (``Hyperparameters.validation_dataset``).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import ConfigDict, Field

from service.core.bodies import RequestBody
from service.core.errors import RequestError
from service.jobs.hyperparameters import Hyperparameters, defaults
from service.jobs.models import Dataset, Job, JobCreate, JobEvent, JobStatus

JOB_PREFIX = "ftjob-"
_JOB_NUMBER = re.compile(r"0|[1-9][0-9]{0,17}")


def timestamp(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def job_number(job_id: str | None) -> int | None:
    """FlashTune's id of ``ftjob-<n>`` (a bare ``<n>`` too); None when it cannot be one. ``<n>`` is written one way
    only, in ASCII digits: ``ftjob-١`` or ``ftjob-01`` is no other name of job 1."""
    number = (job_id or "").removeprefix(JOB_PREFIX)
    return int(number) if _JOB_NUMBER.fullmatch(number) else None


class FineTuneHyperparameters(RequestBody):  # "n_epochs": true is a 422, not 1 epoch (service/core/bodies.py)
    n_epochs: int | str | None = None  # "auto" or a number
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None


class SupervisedMethod(RequestBody):
    hyperparameters: FineTuneHyperparameters = Field(default_factory=FineTuneHyperparameters)


class FineTuneMethod(RequestBody):
    model_config = ConfigDict(extra="allow")  # dpo, reinforcement: named in the 400
    type: str = Field(max_length=64)
    supervised: SupervisedMethod | None = None


class FineTuneCreate(RequestBody):
    # unknown fields are kept so that check() can name them (a 400); the published schema says there are none
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})
    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(default=None, min_length=1, max_length=128)
    hyperparameters: FineTuneHyperparameters | None = None
    method: FineTuneMethod | None = None
    suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    integrations: list[Any] | None = None
    metadata: dict[str, Any] | None = None

    def check(self) -> None:
        """400 for what FlashTune does not do (see the module)."""
        for name in self.model_extra or {}:
            raise unsupported(name[:64], f"the parameter {name[:64]!r} is not supported")
        if self.integrations:
            raise unsupported("integrations", "integrations (Weights & Biases) are not supported")
        if self.metadata:
            raise unsupported("metadata", "metadata is not stored by FlashTune")
        method = self.method
        if method is None:
            return
        if method.type != "supervised":
            raise unsupported("method.type", f"method type {method.type[:64]!r} is not supported: only 'supervised'")
        for name in method.model_extra or {}:
            raise unsupported(f"method.{name[:64]}", f"method.{name[:64]} is not supported: only 'supervised'")
        if self.hyperparameters is not None and method.supervised is not None:
            message = "give the hyperparameters once: in method.supervised.hyperparameters (or the older top level)"
            raise unsupported("hyperparameters", message)

    def chosen_hyperparameters(self) -> FineTuneHyperparameters:
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or FineTuneHyperparameters()

    def to_job_create(self) -> JobCreate:
        """The FlashTune job this asks for: the learning rate is the multiplier times the base model's default;
        the validation file, if any, is the held-out split."""
        self.check()
        hp = self.chosen_hyperparameters()
        where = "method.supervised.hyperparameters" if self.method and self.method.supervised else "hyperparameters"
        multiplier = _number(hp.learning_rate_multiplier, f"{where}.learning_rate_multiplier")
        base_lr = defaults(self.model).learning_rate
        hyper = Hyperparameters(
            epochs=_number(hp.n_epochs, f"{where}.n_epochs"),
            batch_size=_number(hp.batch_size, f"{where}.batch_size"),
            learning_rate=base_lr * multiplier if multiplier else None,
            seed=self.seed,
            validation_dataset=self.validation_file,
        )
        return JobCreate(dataset=self.training_file, base_model=self.model, name=self.suffix, hyperparameters=hyper)


def unsupported(field: str, message: str) -> RequestError:
    return RequestError(400, "unsupported_parameter", message, [{"field": field}])


def _number(value: Any, field: str) -> Any:
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        raise RequestError(422, "invalid_request", f"{field} must be a number or 'auto'", [{"field": field}])
    return value


def file_object(dataset: Dataset, size: int) -> dict[str, Any]:
    """An uploaded training file (``size``: its bytes as uploaded)."""
    return {
        "id": dataset.id,
        "object": "file",
        "bytes": size,
        "created_at": timestamp(dataset.created_at),
        "filename": dataset.filename or dataset.id,
        "purpose": "fine-tune",
        "status": "processed",
        "expires_at": None,
    }


# ------------------------------------------------------------------------------------------------ model names
def model_id(job: Job) -> str | None:
    """The fine-tuned model's id: the adapter name, and ``:<suffix>`` when the job was given one."""
    if not job.adapter:
        return None
    return f"{job.adapter}:{job.name}" if job.name else job.adapter


def split_model_id(model: str) -> tuple[str, str | None]:
    """``job-3:demo`` -> (``job-3``, ``demo``); a name without a suffix -> (name, None)."""
    name, colon, suffix = model.partition(":")
    return (name, suffix) if colon else (model, None)


# ------------------------------------------------------------------------------------------------ results
RESULTS_SUFFIX = "-results"
RESULTS_FILENAME = "step_metrics.csv"


def results_file_id(job_id: int) -> str:
    return f"{JOB_PREFIX}{job_id}{RESULTS_SUFFIX}"


def results_job(file_id: str) -> int | None:
    """The job whose results file ``file_id`` names (``ftjob-<n>-results``), else None."""
    if not file_id.startswith(JOB_PREFIX) or not file_id.endswith(RESULTS_SUFFIX):
        return None
    return job_number(file_id.removesuffix(RESULTS_SUFFIX))


def metrics_csv(losses: dict[str, Any]) -> str:
    """The loss history of a published adapter (``training_info.json``'s ``losses``) as OpenAI's result file:
    ``step,train_loss,valid_loss``, the validation loss on the steps that ended an epoch."""
    valid = {int(step): loss for step, loss in losses.get("eval_loss", [])}
    lines = ["step,train_loss,valid_loss"]
    for step, loss in losses.get("step_loss", []):
        held_out = valid.get(int(step))
        lines.append(f"{int(step)},{loss},{'' if held_out is None else held_out}")
    return "\n".join(lines) + "\n"


def results_file_object(job: Job, size: int) -> dict[str, Any]:
    assert job.id is not None
    return {
        "id": results_file_id(job.id),
        "object": "file",
        "bytes": size,
        "created_at": timestamp(job.finished_at),
        "filename": RESULTS_FILENAME,
        "purpose": "fine-tune-results",
        "status": "processed",
        "expires_at": None,
    }


# ------------------------------------------------------------------------------------------------------ jobs
def job_object(job: Job) -> dict[str, Any]:
    hp = job.hyperparameters
    base_lr = defaults(job.base_model).learning_rate
    error = job.error if job.status == JobStatus.failed else None
    eta = job.progress.get("eta_seconds") if job.status == JobStatus.running else None
    done = job.status == JobStatus.succeeded and job.adapter is not None and job.id is not None
    hyperparameters = {
        "n_epochs": hp["epochs"],
        "batch_size": hp["batch_size"],
        "learning_rate_multiplier": round(hp["learning_rate"] / base_lr, 6),
    }
    return {
        "id": f"{JOB_PREFIX}{job.id}",
        "object": "fine_tuning.job",
        "created_at": timestamp(job.created_at),
        "finished_at": timestamp(job.finished_at),
        "model": job.base_model,
        "fine_tuned_model": model_id(job),
        "organization_id": "flashtune",
        "status": job.status,
        "training_file": job.dataset,
        "validation_file": hp.get("validation_dataset"),
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "result_files": [results_file_id(job.id)] if done and job.id is not None else [],
        "trained_tokens": job.progress.get("trained_tokens") if job.status == JobStatus.succeeded else None,
        "seed": hp["seed"],
        "integrations": [],
        "metadata": None,
        "estimated_finish": int(datetime.now().timestamp() + eta) if eta else None,
        "error": {"code": error["type"], "message": error["message"], "param": None} if error else None,
        "user_provided_suffix": job.name,
    }


EVENT_PREFIX = "ftevent-"


def event_number(event_id: str) -> int | None:
    """FlashTune's id of event ``ftevent-<n>``; None when it cannot be one."""
    number = event_id.removeprefix(EVENT_PREFIX)
    return int(number) if event_id.startswith(EVENT_PREFIX) and _JOB_NUMBER.fullmatch(number) else None


def event_object(event: JobEvent) -> dict[str, Any]:
    return {
        "id": f"{EVENT_PREFIX}{event.id}",
        "object": "fine_tuning.job.event",
        "created_at": timestamp(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": "message",
        "data": event.data,
    }


def adapter_checkpoint(job: Job) -> dict[str, Any]:
    """The published adapter of a succeeded job, as its final checkpoint."""
    return {
        "id": f"ftckpt-{job.id}-final",
        "object": "fine_tuning.job.checkpoint",
        "created_at": timestamp(job.finished_at),
        "fine_tuned_model_checkpoint": model_id(job),
        "fine_tuning_job_id": f"{JOB_PREFIX}{job.id}",
        "step_number": job.progress.get("step", 0),
        "metrics": {"train_loss": job.progress.get("loss")},
    }


def step_checkpoint(job_id: int, step: int, created_at: int) -> dict[str, Any]:
    """An intermediate checkpoint (resumable, not servable)."""
    return {
        "id": f"ftckpt-{job_id}-{step}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": created_at,
        "fine_tuned_model_checkpoint": None,
        "fine_tuning_job_id": f"{JOB_PREFIX}{job_id}",
        "step_number": step,
        "metrics": {},
    }
