"""The OpenAI-compatible objects of ``/v1/files`` and ``/v1/fine_tuning/jobs``, built from FlashTune's rows.

Ids map one to one: file ``ds-…`` is the dataset, job ``ftjob-<n>`` is job ``<n>``, and ``fine_tuned_model`` is
the adapter name that ``/v1/chat/completions`` accepts as ``model``. FlashTune's status names are OpenAI's
(queued, running, succeeded, failed, cancelled). The objects are plain dicts, the shape the ``openai`` client reads.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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


class FineTuneHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "n_epochs": true is a 422, not 1 epoch
    n_epochs: int | str | None = None  # "auto" or a number
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None


class FineTuneCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = None
    hyperparameters: FineTuneHyperparameters = Field(default_factory=FineTuneHyperparameters)
    suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)

    def to_job_create(self) -> JobCreate:
        """The FlashTune job this asks for: the learning rate is the multiplier times the base model's default."""
        hp = self.hyperparameters
        multiplier = _number(hp.learning_rate_multiplier, "hyperparameters.learning_rate_multiplier")
        base_lr = defaults(self.model).learning_rate
        hyper = Hyperparameters(
            epochs=_number(hp.n_epochs, "hyperparameters.n_epochs"),
            batch_size=_number(hp.batch_size, "hyperparameters.batch_size"),
            learning_rate=base_lr * multiplier if multiplier else None,
            seed=self.seed,
        )
        return JobCreate(dataset=self.training_file, base_model=self.model, name=self.suffix, hyperparameters=hyper)


def _number(value: Any, field: str) -> Any:
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        raise RequestError(422, "invalid_request", f"{field} must be a number or 'auto'", [{"field": field}])
    return value


def file_object(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.id,
        "object": "file",
        "bytes": dataset.stats.get("bytes", 0),
        "created_at": timestamp(dataset.created_at),
        "filename": dataset.filename or dataset.id,
        "purpose": "fine-tune",
        "status": "processed",
    }


def job_object(job: Job) -> dict[str, Any]:
    hp = job.hyperparameters
    base_lr = defaults(job.base_model).learning_rate
    error = job.error if job.status == JobStatus.failed else None
    eta = job.progress.get("eta_seconds") if job.status == JobStatus.running else None
    return {
        "id": f"{JOB_PREFIX}{job.id}",
        "object": "fine_tuning.job",
        "created_at": timestamp(job.created_at),
        "finished_at": timestamp(job.finished_at),
        "model": job.base_model,
        "fine_tuned_model": job.adapter,
        "organization_id": "flashtune",
        "status": job.status,
        "training_file": job.dataset,
        "validation_file": None,
        "hyperparameters": {
            "n_epochs": hp["epochs"],
            "batch_size": hp["batch_size"],
            "learning_rate_multiplier": round(hp["learning_rate"] / base_lr, 6),
        },
        "result_files": [],
        "trained_tokens": None,
        "seed": hp["seed"],
        "integrations": [],
        "estimated_finish": int(datetime.now().timestamp() + eta) if eta else None,
        "error": {"code": error["type"], "message": error["message"], "param": None} if error else None,
        "user_provided_suffix": job.name,
    }


def event_object(event: JobEvent) -> dict[str, Any]:
    return {
        "id": f"ftevent-{event.id}",
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
        "fine_tuned_model_checkpoint": job.adapter,
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
