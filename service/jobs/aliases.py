"""Aliases: the names clients call adapters by (``production``), and the promotion gate that moves them.

An alias points at one adapter; ``/analyze`` with ``adapter: "production"`` is served by whatever it points at now,
and the response says both (``"adapter": "job-7", "alias": "production"``). An alias moves two ways:

- by request: ``point`` (``PUT /aliases/{alias}``, ``POST /adapters/{name}/aliases``), a person's decision, recorded
  as an ``alias`` event of the adapter's job;
- by a job that asked for it (``promote_to``, kept as a ``Promotion`` row from ``request_promotion``): its job
  process evaluates the alias's adapter then (``incumbent``) beside the base and the new adapter on the job's own
  held-out items (workers/training/evaluation.py); when the job has succeeded, ``decide`` (called by the worker in
  the transaction that records the success) moves the alias only if the new adapter's macro-F1 beats both the
  base's and the incumbent's on those items. Either way a ``promotion`` event and the ``Promotion`` row say why.

``latest_evaluated`` is what ``latest`` means: the newest adapter on the served base that has a held-out
evaluation, so that a job on a one-line dataset never becomes what the default ``/analyze`` serves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service.core.config import Settings
from service.core.errors import RequestError
from service.core.layout import adapter_job_id
from service.core.training_info import FILENAME as TRAINING_INFO
from service.core.training_info import read_training_info
from service.jobs import jobstore
from service.jobs.models import (
    ALIAS_PATTERN,
    Alias,
    Job,
    JobStatus,
    Promotion,
    PromotionStatus,
    check_alias_name,
    utcnow,
)

log = logging.getLogger("flashtune.aliases")
LATEST_SCAN = 100  # 'latest' looks at this many of the newest adapters for one with a held-out evaluation
METRIC = "macro_f1"


# ------------------------------------------------------------------------------------------------------ reads
def get(session: Session, name: str) -> Alias | None:
    """The alias ``name``; None also for a name no alias can have (never sent to the database: a NUL byte, say)."""
    if not ALIAS_PATTERN.match(name):
        return None
    return session.get(Alias, name, populate_existing=True)


def list_all(session: Session) -> list[Alias]:
    return list(session.exec(select(Alias).order_by(col(Alias.name))).all())


def names_for(session: Session, adapter: str) -> list[str]:
    """The aliases pointing at ``adapter``."""
    return list(session.exec(select(Alias.name).where(col(Alias.adapter) == adapter).order_by(col(Alias.name))).all())


def promotion(session: Session, job_id: int) -> Promotion | None:
    return session.get(Promotion, job_id, populate_existing=True)


# ----------------------------------------------------------------------------------------------- set by request
def checked_name(name: str, field: str = "alias") -> str:
    """``name`` if it can name an alias (``service.jobs.models.check_alias_name``), else a 422 naming ``field``."""
    try:
        return check_alias_name(name)
    except ValueError as exc:
        raise RequestError(422, "invalid_request", f"{field}: {exc}", [{"field": field, "message": str(exc)}]) from exc


def point(session: Session, settings: Settings, *, alias: str, job: Job, reason: str) -> Alias:
    """Point ``alias`` (a checked name) at the adapter of ``job`` (a succeeded job with an adapter, checked by the
    caller: ``commands.adapter_job``); an ``alias`` event of that job records it. 409 for an adapter trained on
    another base model than the served one: the alias would only answer errors."""
    assert job.adapter is not None and job.id is not None
    if job.base_model != settings.base_model:
        raise RequestError(
            409,
            "base_model_mismatch",
            f"adapter {job.adapter} was trained on {job.base_model[:200]!r}; this server serves "
            f"{settings.base_model[:200]!r}, so {alias} would answer nothing",
        )
    row = session.get(Alias, alias, with_for_update=True, populate_existing=True)
    previous = row.adapter if row is not None else None
    if row is None:
        try:
            with session.begin_nested():  # a concurrent request may create it first: then move that one
                row = Alias(name=alias, adapter=job.adapter, reason=reason)
                session.add(row)
        except IntegrityError:
            row = session.get(Alias, alias, with_for_update=True, populate_existing=True)
            assert row is not None
            previous = row.adapter
    row.adapter, row.reason, row.updated_at = job.adapter, reason, utcnow()
    session.add(row)
    was = f" (was {previous})" if previous and previous != job.adapter else ""
    jobstore.add_event(
        session,
        job.id,
        "alias",
        f"alias {alias} points at {job.adapter}{was}: {reason}",
        {"alias": alias, "previous": previous},
    )
    session.flush()
    return row


def remove(session: Session, alias: str) -> Alias | None:
    """Drop ``alias``; the adapter it pointed at stays (an ``alias_removed`` event of its job says so). None when
    there was no such alias."""
    row = session.get(Alias, alias, with_for_update=True) if ALIAS_PATTERN.match(alias) else None
    if row is not None:
        session.delete(row)
        job_id = adapter_job_id(row.adapter)
        if job_id is not None and jobstore.get(session, job_id) is not None:
            message = f"alias {alias} removed; it pointed at {row.adapter}"
            jobstore.add_event(session, job_id, "alias_removed", message, {"alias": alias})
        session.flush()
    return row


# ------------------------------------------------------------------------------------------------- promotions
def request_promotion(session: Session, job_id: int, alias: str) -> None:
    """Job ``job_id`` (being queued in this transaction) asks to become ``alias``'s adapter when it succeeds."""
    session.add(Promotion(job_id=job_id, alias=alias))


def incumbent(session: Session, settings: Settings, job: Job) -> tuple[str, Path] | None:
    """The adapter (name, folder) a promoting job must beat, read when its training starts: the one its alias points
    at, if that adapter is there and was trained on the job's base model. None: the job only has to beat the base
    (no promotion asked, or the alias is not set yet), or it cannot be compared (``decide`` then says so)."""
    request = session.get(Promotion, job.id) if job.id is not None else None
    row = session.get(Alias, request.alias) if request is not None else None
    if row is None:
        return None
    job_id = adapter_job_id(row.adapter)
    target = jobstore.get(session, job_id) if job_id is not None else None
    if target is None or target.adapter != row.adapter or target.base_model != job.base_model:
        return None
    return row.adapter, settings.layout.adapter_dir(row.adapter)


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    message: str
    comparison: dict[str, Any]
    hint: str | None = None


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in (METRIC, "accuracy") if k in metrics}


def judge(metrics: dict[str, Any], adapter: str, alias: str, current: str | None) -> Verdict:
    """Whether ``adapter`` (its held-out ``metrics``, training_info.json's) may become ``alias``, which points at
    ``current`` now: its macro-F1 must beat the base's and, where the alias is set, ``current``'s, all scored on the
    same held-out items in one evaluation (``metrics["incumbent"]`` is ``current`` there)."""
    count = int(metrics.get("num_labelled") or 0)
    mine, base, other = metrics.get("adapter") or {}, metrics.get("base") or {}, metrics.get("incumbent") or {}
    comparison: dict[str, Any] = {
        "metric": METRIC,
        "items": count,
        "adapter": {"name": adapter, **_scores(mine)},
        "base": _scores(base),
        "incumbent": {"name": other.get("name"), **_scores(other)} if other.get("name") else None,
        "alias_was": current,
    }
    stays = f"{alias} stays {current}" if current else f"{alias} is not set"
    if not count or METRIC not in mine:
        hint = "give the job labelled validation items (hyperparameters.validation_fraction above 0, or a split)"
        return Verdict(
            False, f"{stays}: this job has no held-out evaluation (no labelled validation items)", comparison, hint
        )
    f1, same = mine[METRIC], f"on the same {count} held-out items"
    base_f1 = base.get(METRIC, 0.0)
    if f1 <= base_f1:
        return Verdict(False, f"{stays}: macro-F1 {f1:.4f} does not beat the base's {base_f1:.4f} {same}", comparison)
    if current is not None and (other.get("name") != current or METRIC not in other):
        why = other.get("error") or (
            f"it was compared with {other['name']}, which {alias} pointed at when training started"
            if other.get("name") and other.get("name") != current
            else f"{current} could not be evaluated beside it (another base model, or its files are gone)"
        )
        return Verdict(False, f"{stays}: this job was not evaluated against {current} ({why})", comparison)
    if current is not None and f1 <= other[METRIC]:
        return Verdict(
            False, f"{stays}: macro-F1 {f1:.4f} does not beat {current}'s {other[METRIC]:.4f} {same}", comparison
        )
    beaten = f"the base's {base_f1:.4f}" + (f" and {current}'s {other[METRIC]:.4f}" if current is not None else "")
    return Verdict(True, f"promoted to {alias}: macro-F1 {f1:.4f} beats {beaten} {same}", comparison)


def decide(session: Session, settings: Settings, job_id: int, adapter: str) -> Promotion | None:
    """Job ``job_id`` has just succeeded with ``adapter`` (in this transaction): if it asked to be promoted, move its
    alias when the job's evaluation says so (``judge``), and record the decision and its reason either way. Never
    raises: whatever goes wrong is the decision's reason, and the success is recorded all the same."""
    request = session.get(Promotion, job_id, with_for_update=True, populate_existing=True)
    if request is None or request.status != PromotionStatus.pending:
        return None
    try:
        with session.begin_nested():
            verdict = _decide(session, settings, request, adapter)
    except IntegrityError:  # the alias was created by a request while this was decided: that request wins
        verdict = Verdict(False, f"{request.alias} unchanged: it was set by a request at the same moment", {})
    except Exception as exc:  # a bug or a database hiccup here must not undo the job's success
        log.exception("job %s: the promotion to %s could not be decided", job_id, request.alias)
        verdict = Verdict(
            False, f"{request.alias} unchanged: the promotion could not be decided ({type(exc).__name__})", {}
        )
    request.status = PromotionStatus.promoted if verdict.promoted else PromotionStatus.kept
    request.reason, request.comparison, request.decided_at = verdict.message, verdict.comparison, utcnow()
    session.add(request)
    data = {"alias": request.alias, "promoted": verdict.promoted, **verdict.comparison}
    if verdict.hint:
        data["hint"] = verdict.hint
    jobstore.add_event(session, job_id, "promotion", verdict.message, data, "info" if verdict.promoted else "warning")
    return request


def _decide(session: Session, settings: Settings, request: Promotion, adapter: str) -> Verdict:
    info = read_training_info(settings.layout.adapter_dir(adapter))
    row = session.get(Alias, request.alias, with_for_update=True, populate_existing=True)
    verdict = judge(info.get("metrics") or {}, adapter, request.alias, row.adapter if row else None)
    if verdict.promoted:
        reason = f"promoted by job {request.job_id}: {verdict.message.split(': ', 1)[1]}"
        if row is None:
            session.add(Alias(name=request.alias, adapter=adapter, reason=reason))
        else:
            row.adapter, row.reason, row.updated_at = adapter, reason, utcnow()
            session.add(row)
        session.flush()  # a concurrent request that created the alias meanwhile: IntegrityError, nothing promoted
    return verdict


# ------------------------------------------------------------------------------------------------------ latest
_evaluated: dict[str, tuple[int, bool]] = {}  # adapter folder -> (training_info.json mtime, has an evaluation)


def has_evaluation(adapter_dir: Path) -> bool:
    """Whether the adapter's training_info.json records a held-out evaluation (labelled validation items)."""
    try:
        stamp = (adapter_dir / TRAINING_INFO).stat().st_mtime_ns
    except OSError:
        return False
    cached = _evaluated.get(str(adapter_dir))
    if cached is None or cached[0] != stamp:
        metrics = read_training_info(adapter_dir).get("metrics") or {}
        cached = (stamp, bool(metrics.get("num_labelled")) and METRIC in (metrics.get("adapter") or {}))
        _evaluated[str(adapter_dir)] = cached
    return cached[1]


def latest_evaluated(session: Session, settings: Settings) -> Job | None:
    """The newest succeeded job on the served base whose adapter has a held-out evaluation."""
    newest = session.exec(
        select(Job)
        .where(
            col(Job.status) == JobStatus.succeeded,
            col(Job.base_model) == settings.base_model,
            col(Job.adapter).is_not(None),
        )
        .order_by(col(Job.finished_at).desc(), col(Job.id).desc())
        .limit(LATEST_SCAN)
    ).all()
    return next(
        (job for job in newest if job.adapter and has_evaluation(settings.layout.adapter_dir(job.adapter))), None
    )
