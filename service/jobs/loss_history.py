"""The loss history of a job, also while it runs: ``GET /jobs/{id}/metrics`` (and the dashboard's loss chart).

The training child appends one line per optimizer step to ``DATA_DIR/jobs/<id>/steps.jsonl`` (``StepLog``);
the evaluation loss at each epoch end is in the job's ``epoch`` events. Once the job has published its adapter,
the adapter's ``training_info.json`` holds the whole history and is used instead.

A requeued job resumes from its newest checkpoint, so its steps file can hold steps that a later attempt trains
again: a line whose step is not past the previous one starts over from that step (``read_steps``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from sqlmodel import Session, col, select

from service.core.config import Settings
from service.core.layout import STEPS_FILE
from service.core.training_info import read_training_info
from service.jobs.models import Job, JobEvent, JobMetrics, JobStatus


class StepLog:
    """Appends each step's progress to the job's steps file (written by the training child, one process)."""

    def __init__(self, job_dir: Path) -> None:
        self.path = job_dir / STEPS_FILE
        self.last_step = -1

    def append(self, progress: dict[str, Any]) -> None:
        step = int(progress.get("step") or 0)
        if step <= 0 or step == self.last_step:  # the loop reports a step twice when it stops there
            return
        self.last_step = step
        line = {key: progress.get(key) for key in ("step", "loss", "epoch", "learning_rate", "tokens_per_second")}
        line["time"] = round(time.time(), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def read_steps(path: Path) -> list[tuple[int, float]]:
    """(step, loss) in step order; a line that goes back in steps (a resumed attempt) replaces what followed."""
    points: list[tuple[int, float]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return points
    for line in lines:
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), record["loss"]
        except (ValueError, KeyError, TypeError):
            continue  # a line being written right now, or damaged: skip it
        if not isinstance(loss, int | float):
            continue
        while points and points[-1][0] >= step:
            points.pop()
        points.append((step, float(loss)))
    return points


def _eval_from_events(session: Session, job_id: int) -> list[tuple[int, float | None]]:
    events = session.exec(
        select(JobEvent).where(col(JobEvent.job_id) == job_id, col(JobEvent.type) == "epoch").order_by(col(JobEvent.id))
    ).all()
    by_step: dict[int, float | None] = {}
    for event in events:
        step, loss = event.data.get("step"), event.data.get("eval_loss")
        if isinstance(step, int):
            by_step[step] = float(loss) if isinstance(loss, int | float) else None
    return sorted(by_step.items())


def _training_info(settings: Settings, job: Job) -> dict[str, Any] | None:
    if not job.adapter:
        return None
    return read_training_info(settings.layout.adapter_dir(job.adapter)) or None


def thin(points: list[Any], max_points: int) -> list[Any]:
    """At most ``max_points`` of ``points``, evenly spaced, always keeping the last one."""
    if len(points) <= max_points:
        return points
    stride = len(points) / (max_points - 1)
    return [points[int(i * stride)] for i in range(max_points - 1)] + [points[-1]]


def job_metrics(settings: Settings, session: Session, job: Job, max_points: int) -> JobMetrics:
    assert job.id is not None
    info = _training_info(settings, job)
    source: Literal["adapter", "live", "none"]
    if info is not None:
        losses = info.get("losses", {})
        train = [(int(s), float(v)) for s, v in losses.get("step_loss", [])]
        evals = [(int(s), None if v is None else float(v)) for s, v in losses.get("eval_loss", [])]
        epochs = [(int(e), float(v)) for e, v in losses.get("epoch_loss", [])]
        source = "adapter"
    else:
        train = read_steps(settings.layout.steps_file(job.id))
        evals = _eval_from_events(session, job.id)
        epochs = []
        source = "live" if train or evals else "none"
    progress = job.progress or {}
    return JobMetrics(
        job_id=job.id,
        status=JobStatus(job.status),
        step=int(progress.get("step") or 0),
        total_steps=int(progress.get("total_steps") or 0),
        num_train_points=len(train),
        train_loss=thin(train, max_points),
        eval_loss=evals,
        epoch_loss=epochs,
        source=source,
    )
