"""Prometheus figures for ``GET /metrics``, in the text exposition format (version 0.0.4).

The format is small enough to write by hand, which keeps ``prometheus_client`` out of the runtime dependencies.
Two kinds of figure:

- job figures (jobs by status, queue depth and wait, training tokens/s) are read from the database at scrape
  time, so every API replica reports the same queue and nothing has to be kept in step with the workers;
- ``/analyze`` latency and batch sizes are observed in this process (histograms below), because only the API
  process sees those requests.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from service.jobs.models import Job, JobStatus, utcnow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def sample(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    inner = ",".join(f'{key}="{_escape(str(val))}"' for key, val in labels.items())
    return f"{name}{{{inner}}} {_number(value)}"


def family(name: str, kind: str, help_text: str, samples: Sequence[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class Histogram:
    """A cumulative-bucket histogram that is safe to observe from FastAPI's worker threads."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help_text = help_text
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = [], 0
        for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
            running += count
            lines.append(sample(f"{self.name}_bucket", running, {"le": _number(bound)}))
        lines += [sample(f"{self.name}_sum", total), sample(f"{self.name}_count", running)]
        return family(self.name, "histogram", self.help_text, lines)


ANALYZE_LATENCY = Histogram(
    "flashtune_analyze_latency_seconds", "Time to answer one /analyze request.", LATENCY_BUCKETS
)
ANALYZE_BATCH_SIZE = Histogram(
    "flashtune_analyze_batch_size", "Size of the forward pass that served each /analyze request.", BATCH_BUCKETS
)


def observe_analyze(started: float, results: Sequence[dict[str, Any]]) -> None:
    """Record one /analyze request: its latency since ``started`` (``time.perf_counter()``) and the size of the
    forward pass that served it (``batch_size`` in a result, which micro-batching can make larger than the
    request; otherwise the number of results)."""
    ANALYZE_LATENCY.observe(time.perf_counter() - started)
    if results:
        ANALYZE_BATCH_SIZE.observe(float(results[0].get("batch_size") or len(results)))


# ------------------------------------------------------------------------------------------------ job figures
@dataclass
class JobFigures:
    by_status: dict[str, int]
    queue_depth: int
    runnable: int
    oldest_wait_seconds: float
    tokens_per_second: dict[int, float] = field(default_factory=dict)


def _aware(moment: datetime) -> datetime:
    # SQLite hands datetimes back without a zone; everything FlashTune writes is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def collect_jobs(session: Session, now: datetime | None = None) -> JobFigures:
    now = now or utcnow()
    counts = {str(status): 0 for status in JobStatus}
    for status, count in session.exec(select(Job.status, func.count()).group_by(col(Job.status))).all():
        counts[str(status)] = int(count)
    # A queued job is waiting for a worker from its run_after on (creation, or the end of a retry backoff).
    runnable, oldest = session.exec(
        select(func.count(), func.min(col(Job.run_after))).where(
            col(Job.status) == JobStatus.queued, col(Job.run_after) <= now
        )
    ).one()
    wait = max(0.0, (now - _aware(oldest)).total_seconds()) if oldest is not None else 0.0
    speeds = {}
    for job_id, progress in session.exec(select(Job.id, Job.progress).where(col(Job.status) == JobStatus.running)):
        value = (progress or {}).get("tokens_per_second")
        if job_id is not None and isinstance(value, int | float):
            speeds[int(job_id)] = float(value)
    return JobFigures(counts, counts[JobStatus.queued], int(runnable), wait, speeds)


def render(jobs: JobFigures, base_model: str, model_loaded: bool, adapters: Sequence[str]) -> str:
    speeds = [
        sample("flashtune_training_tokens_per_second", v, {"job_id": str(k)})
        for k, v in sorted(jobs.tokens_per_second.items())
    ]
    lines = [
        *family(
            "flashtune_jobs",
            "gauge",
            "Jobs by status.",
            [sample("flashtune_jobs", n, {"status": s}) for s, n in jobs.by_status.items()],
        ),
        *family(
            "flashtune_queue_depth",
            "gauge",
            "Queued jobs, including those waiting out a retry backoff.",
            [sample("flashtune_queue_depth", jobs.queue_depth)],
        ),
        *family(
            "flashtune_queue_runnable",
            "gauge",
            "Queued jobs that a free worker would claim now.",
            [sample("flashtune_queue_runnable", jobs.runnable)],
        ),
        *family(
            "flashtune_queue_wait_seconds",
            "gauge",
            "How long the oldest runnable queued job has waited.",
            [sample("flashtune_queue_wait_seconds", jobs.oldest_wait_seconds)],
        ),
        *family("flashtune_training_tokens_per_second", "gauge", "Training throughput of each running job.", speeds),
        *family(
            "flashtune_training_tokens_per_second_total",
            "gauge",
            "Training throughput of all running jobs.",
            [sample("flashtune_training_tokens_per_second_total", sum(jobs.tokens_per_second.values()))],
        ),
        *family(
            "flashtune_model_loaded",
            "gauge",
            "1 when the serving base model is in memory.",
            [sample("flashtune_model_loaded", int(model_loaded), {"base_model": base_model})],
        ),
        *family(
            "flashtune_loaded_adapters",
            "gauge",
            "Adapters attached to the serving model.",
            [sample("flashtune_loaded_adapters", len(adapters))],
        ),
        *family(
            "flashtune_adapter_loaded",
            "gauge",
            "1 for each adapter attached to the serving model.",
            [sample("flashtune_adapter_loaded", 1, {"adapter": name}) for name in sorted(adapters)],
        ),
        *ANALYZE_LATENCY.render(),
        *ANALYZE_BATCH_SIZE.render(),
    ]
    return "\n".join(lines) + "\n"
