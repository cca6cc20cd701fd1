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

from sqlmodel import Session

from service.jobs import jobstore
from service.jobs.models import JobStatus, utcnow

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
    counts = jobstore.count_by_status(session)
    runnable, oldest = jobstore.runnable_queue(session, now)
    wait = max(0.0, (now - _aware(oldest)).total_seconds()) if oldest is not None else 0.0
    speeds = {}
    for job_id, progress in jobstore.running_progress(session):
        value = progress.get("tokens_per_second")
        if isinstance(value, int | float):
            speeds[job_id] = float(value)
    return JobFigures(counts, counts[JobStatus.queued], runnable, wait, speeds)


def _gauge(name: str, help_text: str, value: float, labels: dict[str, str] | None = None) -> list[str]:
    return family(name, "gauge", help_text, [sample(name, value, labels)])


def _job_families(jobs: JobFigures) -> list[str]:
    speeds = [
        sample("flashtune_training_tokens_per_second", v, {"job_id": str(k)})
        for k, v in sorted(jobs.tokens_per_second.items())
    ]
    by_status = [sample("flashtune_jobs", n, {"status": s}) for s, n in jobs.by_status.items()]
    return [
        *family("flashtune_jobs", "gauge", "Jobs by status.", by_status),
        *_gauge("flashtune_queue_depth", "Queued jobs, including those waiting out a retry backoff.", jobs.queue_depth),
        *_gauge("flashtune_queue_runnable", "Queued jobs that a free worker would claim now.", jobs.runnable),
        *_gauge(
            "flashtune_queue_wait_seconds",
            "How long the oldest runnable queued job has waited.",
            jobs.oldest_wait_seconds,
        ),
        *family("flashtune_training_tokens_per_second", "gauge", "Training throughput of each running job.", speeds),
        *_gauge(
            "flashtune_training_tokens_per_second_total",
            "Training throughput of all running jobs.",
            sum(jobs.tokens_per_second.values()),
        ),
    ]


def _serving_families(base_model: str, model_loaded: bool, adapters: Sequence[str]) -> list[str]:
    loaded = [sample("flashtune_adapter_loaded", 1, {"adapter": name}) for name in sorted(adapters)]
    return [
        *_gauge(
            "flashtune_model_loaded",
            "1 when the serving base model is in memory.",
            int(model_loaded),
            {"base_model": base_model},
        ),
        *_gauge("flashtune_loaded_adapters", "Adapters attached to the serving model.", len(adapters)),
        *family("flashtune_adapter_loaded", "gauge", "1 for each adapter attached to the serving model.", loaded),
        *ANALYZE_LATENCY.render(),
        *ANALYZE_BATCH_SIZE.render(),
    ]


def render(jobs: JobFigures, base_model: str, model_loaded: bool, adapters: Sequence[str]) -> str:
    return "\n".join([*_job_families(jobs), *_serving_families(base_model, model_loaded, adapters)]) + "\n"
