"""Responses of ``/jobs``, ``/datasets`` and ``/adapters``, each built from its table row with ``of``.

The request shapes are the domain's own: ``service.jobs.models.JobCreate`` and
``service.jobs.hyperparameters.Hyperparameters`` (``service.jobs.commands.queue_job`` takes them as they come).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.api.schemas.aliases import PromotionPublic
from service.jobs.hyperparameters import ResolvedHyperparameters
from service.jobs.models import Dataset, Job, JobError, JobEvent, JobStatus, Progress


class JobPublic(BaseModel):
    id: int
    name: str | None
    status: JobStatus
    base_model: str
    dataset: str
    hyperparameters: ResolvedHyperparameters
    progress: Progress
    attempts: int
    max_attempts: int
    error: JobError | None
    adapter: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls.model_validate(job, from_attributes=True)


class JobsPage(BaseModel):
    data: list[JobPublic]
    has_more: bool
    next_after: int | None


class JobEventPublic(BaseModel):
    id: int
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any]

    @classmethod
    def of(cls, event: JobEvent) -> JobEventPublic:
        return cls.model_validate(event, from_attributes=True)


class EventsPage(BaseModel):
    data: list[JobEventPublic]
    has_more: bool


class DatasetPublic(BaseModel):
    id: str
    format: str
    filename: str | None
    num_examples: int
    num_validation: int
    label_distribution: dict[str, int]
    unlabelled: int
    duplicates_removed: int
    rejected: list[dict[str, Any]]
    rejected_count: int
    options: dict[str, Any] = Field(default_factory=dict, description="the options the upload was parsed with")
    details: dict[str, Any] = Field(
        default_factory=dict, description="what the format reports: CSV columns used; database thresholds and split"
    )
    input_fields: list[str] = Field(
        default_factory=list, description="optional fields (metadata, market context) the example inputs carry"
    )
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetPublic:
        """The row with its upload statistics (``Dataset.stats``, written by ``service.datasets.store``) spread out."""
        s = dataset.stats
        return cls(
            id=dataset.id,
            format=dataset.format,
            filename=dataset.filename,
            num_examples=dataset.num_examples,
            num_validation=s.get("num_validation", 0),
            label_distribution=s.get("label_distribution", {}),
            unlabelled=s.get("unlabelled", 0),
            duplicates_removed=s.get("duplicates_removed", 0),
            rejected=s.get("rejected", []),
            rejected_count=s.get("rejected_count", 0),
            options=s.get("options", {}),
            details=s.get("details", {}),
            input_fields=s.get("input_fields", []),
            sha256=dataset.sha256,
            created_at=dataset.created_at,
        )


class AdapterPublic(BaseModel):
    name: str
    job_id: int
    base_model: str
    dataset: str
    created_at: datetime | None
    files: list[dict[str, Any]]
    metrics: dict[str, Any]
    input_fields: list[str] | None = Field(
        default=None, description="optional input fields its training inputs carried (/analyze passes only these)"
    )
    aliases: list[str] = Field(default_factory=list, description="the aliases pointing at it (GET /aliases)")
    promotion: PromotionPublic | None = Field(
        default=None, description="its job's promote_to and the decision: the macro-F1 comparison and why"
    )

    @classmethod
    def of(cls, job: Job, files: list[dict[str, Any]], info: dict[str, Any]) -> AdapterPublic:
        """A succeeded job's adapter: its ``files`` and its ``training_info.json`` (``info``)."""
        assert job.adapter is not None and job.id is not None
        metrics = {**info.get("metrics", {}), "losses": info.get("losses", {}), "durations": info.get("durations", {})}
        return cls(
            name=job.adapter,
            job_id=job.id,
            base_model=job.base_model,
            dataset=job.dataset,
            created_at=job.finished_at,
            files=files,
            metrics=metrics,
            input_fields=info.get("input_fields"),
        )
