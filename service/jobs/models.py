"""The job domain's tables (``Job``, ``JobEvent``, ``Dataset``; ``Alias`` and ``Promotion``, service/jobs/aliases.py)
and the shapes both processes read them with.

``JobCreate`` is the job a user asks for (validated here, queued by ``service.jobs.commands.queue_job``);
``Progress`` and ``JobError`` are what the worker writes into ``Job.progress`` and ``Job.error``; ``JobMetrics`` is
the loss history ``service.jobs.loss_history`` builds. The hyperparameters' shapes live with their recipes in
``service.jobs.hyperparameters``; the HTTP responses (``JobPublic``, pages, ``DatasetPublic``, ``AdapterPublic``)
in ``service.api.schemas``: the worker never needs them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import JSON, Column, Index
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

from service.core.bodies import RequestBody
from service.core.layout import adapter_job_id
from service.jobs.hyperparameters import Hyperparameters


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Strict(RequestBody):
    """A request body: unknown fields refused, no JSON value converted (service/core/bodies.py)."""


# -------------------------------------------------------------------------------------------------- alias names
ALIAS_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" would take a trailing newline
RESERVED_ALIASES = ("latest", "none")  # what /analyze's adapter field means by itself


def check_alias_name(name: str) -> str:
    """``name`` if it can name an alias: a letter, then up to 63 letters, digits, '.', '_' or '-'; not 'latest' or
    'none', and not an adapter's own name (``job-<id>``), so that a name means one thing. Raises ValueError."""
    if not ALIAS_PATTERN.match(name):
        raise ValueError("an alias is a letter followed by up to 63 letters, digits, '.', '_' or '-'")
    if name in RESERVED_ALIASES or adapter_job_id(name) is not None:
        raise ValueError(f"{name!r} is reserved: 'latest', 'none' and adapter names (job-<id>) cannot be aliases")
    return name


# --------------------------------------------------------------------------------------------------------- jobs
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_ID = 2**63 - 1  # SQL BIGINT: a larger id cannot exist, and binding one would overflow the driver


class JobCreate(Strict):
    """A job as a user asks for it (``POST /jobs``; ``/v1/fine_tuning/jobs`` is translated into one)."""

    dataset: str = Field(min_length=1, max_length=128, description='"builtin" or a dataset id', examples=["builtin"])
    base_model: str | None = Field(default=None, min_length=1, max_length=512, examples=["builtin"])
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    promote_to: str | None = Field(
        default=None,
        description="an alias (e.g. 'production') to move to this job's adapter when it succeeds, only if its "
        "held-out macro-F1 beats both the base and the alias's current adapter on the same items",
    )

    @field_validator("promote_to")
    @classmethod
    def _alias_name(cls, value: str | None) -> str | None:
        return None if value is None else check_alias_name(value)


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    total_epochs: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    fraction: float = 0.0
    trained_tokens: int | None = None  # tokens through the forward passes so far, every attempt together


class JobError(BaseModel):
    type: str
    message: str
    hint: str | None = None


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "status", "run_after", "id"),)

    id: int | None = SQLField(default=None, primary_key=True)
    name: str | None = None
    status: str = SQLField(default=JobStatus.queued, index=True)
    base_model: str
    dataset: str
    hyperparameters: dict[str, Any] = SQLField(sa_column=Column(JSON, nullable=False))
    progress: dict[str, Any] = SQLField(default_factory=dict, sa_column=Column(JSON, nullable=False))
    attempts: int = 0
    max_attempts: int = 3
    error: dict[str, Any] | None = SQLField(default=None, sa_column=Column(JSON, nullable=True))
    adapter: str | None = None
    worker_id: str | None = None
    heartbeat_at: datetime | None = None
    run_after: datetime = SQLField(default_factory=utcnow)
    idempotency_key: str | None = SQLField(default=None, unique=True)
    request_hash: str | None = None
    created_at: datetime = SQLField(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobMetrics(BaseModel):
    """The loss history of a job so far (service/jobs/loss_history.py); points are ``[step, loss]``."""

    job_id: int
    status: JobStatus
    step: int = Field(description="the job's progress step")
    total_steps: int
    num_train_points: int = Field(description="training-loss points recorded; train_loss may be thinned")
    train_loss: list[tuple[int, float]] = Field(description="training loss of each optimizer step, step order")
    eval_loss: list[tuple[int, float | None]] = Field(description="held-out loss at each epoch end")
    epoch_loss: list[tuple[int, float]] = Field(description="[epoch, mean training loss]; once the job succeeded")
    source: Literal["adapter", "live", "none"] = Field(
        description="adapter: the published training_info.json; live: the running job's step log and events"
    )


class JobEvent(SQLModel, table=True):
    __tablename__ = "job_events"

    id: int | None = SQLField(default=None, primary_key=True)
    job_id: int = SQLField(foreign_key="jobs.id", index=True)
    created_at: datetime = SQLField(default_factory=utcnow)
    level: str = "info"
    type: str
    message: str
    data: dict[str, Any] = SQLField(default_factory=dict, sa_column=Column(JSON, nullable=False))


# ----------------------------------------------------------------------------------------------------- datasets
BUILTIN_DATASET = "builtin"  # the id of the built-in data set (service/llm/builtin/data.py): no row, always there


class Dataset(SQLModel, table=True):
    __tablename__ = "datasets"

    id: str = SQLField(primary_key=True)  # "ds-" + first 16 hex digits of the sha256 of the upload
    sha256: str = SQLField(index=True)
    format: str
    filename: str | None = None
    num_examples: int
    stats: dict[str, Any] = SQLField(sa_column=Column(JSON, nullable=False))
    created_at: datetime = SQLField(default_factory=utcnow)


# ------------------------------------------------------------------------------------------------------ aliases
class Alias(SQLModel, table=True):
    """A name the clients call an adapter by (``production``): ``/analyze`` with ``adapter: "production"`` is served
    by whatever adapter it points at now (service/jobs/aliases.py)."""

    __tablename__ = "aliases"

    name: str = SQLField(primary_key=True)
    adapter: str  # an adapter name (job-<id>)
    updated_at: datetime = SQLField(default_factory=utcnow)
    reason: str = ""  # why it points there: set by request, or promoted by a job's evaluation


class PromotionStatus(StrEnum):
    pending = "pending"  # the job has not succeeded yet
    promoted = "promoted"
    kept = "kept"  # the alias stayed; ``Promotion.reason`` says why


class Promotion(SQLModel, table=True):
    """A job's request to be promoted to an alias when it succeeds (``JobCreate.promote_to``), and the decision."""

    __tablename__ = "promotions"

    job_id: int = SQLField(primary_key=True, foreign_key="jobs.id")
    alias: str
    status: str = PromotionStatus.pending
    reason: str | None = None
    comparison: dict[str, Any] = SQLField(default_factory=dict, sa_column=Column(JSON, nullable=False))
    decided_at: datetime | None = None


# ------------------------------------------------------------------------------------------------------ workers
class WorkerRecord(SQLModel, table=True):
    """One ``flashtune worker`` process, kept fresh by its heartbeat thread (service/jobs/workers.py): the API says
    from these rows whether any worker is alive while jobs wait."""

    __tablename__ = "workers"

    id: str = SQLField(primary_key=True)  # the worker id, as on the jobs it claims (Job.worker_id)
    hostname: str
    pid: int
    started_at: datetime = SQLField(default_factory=utcnow)
    last_seen_at: datetime = SQLField(default_factory=utcnow, index=True)
    stopped_at: datetime | None = None  # set when it exits cleanly
