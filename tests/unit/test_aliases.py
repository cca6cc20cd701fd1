"""The promotion gate's rule (``aliases.judge``), the alias table and the decision recorded with a job's success,
on SQLite and PostgreSQL (service/jobs/aliases.py). No processes: the job rows are written directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from service.core.config import Settings
from service.core.errors import RequestError
from service.jobs import aliases
from service.jobs.db import session_scope
from service.jobs.models import Job, JobCreate, JobEvent, JobStatus, Promotion, check_alias_name


def scores(f1: float) -> dict[str, float]:
    return {"macro_f1": f1, "accuracy": f1}


def metrics(adapter: float, base: float, incumbent: tuple[str, float] | None = None, items: int = 60) -> dict[str, Any]:
    out: dict[str, Any] = {"num_labelled": items, "adapter": scores(adapter), "base": scores(base)}
    if incumbent is not None:
        out["incumbent"] = {"name": incumbent[0], **scores(incumbent[1])}
    return out


# ------------------------------------------------------------------------------------------------------ judge
def test_a_first_promotion_must_beat_the_base() -> None:
    verdict = aliases.judge(metrics(0.8, 0.3), "job-2", "production", None)
    assert verdict.promoted and verdict.message == (
        "promoted to production: macro-F1 0.8000 beats the base's 0.3000 on the same 60 held-out items"
    )
    assert verdict.comparison["incumbent"] is None and verdict.comparison["alias_was"] is None
    kept = aliases.judge(metrics(0.3, 0.3), "job-2", "production", None)
    assert not kept.promoted and kept.message.startswith("production is not set: macro-F1 0.3000 does not beat")


def test_a_promotion_must_beat_the_incumbent_on_the_same_items() -> None:
    better = aliases.judge(metrics(0.8, 0.3, ("job-1", 0.6)), "job-2", "production", "job-1")
    assert better.promoted and "beats the base's 0.3000 and job-1's 0.6000 on the same 60" in better.message
    assert better.comparison["incumbent"] == {"name": "job-1", **scores(0.6)}
    worse = aliases.judge(metrics(0.5, 0.3, ("job-1", 0.6)), "job-3", "production", "job-1")
    assert not worse.promoted
    assert (
        worse.message
        == "production stays job-1: macro-F1 0.5000 does not beat job-1's 0.6000 on the same 60 held-out items"
    )
    tie = aliases.judge(metrics(0.6, 0.3, ("job-1", 0.6)), "job-3", "production", "job-1")
    assert not tie.promoted  # beating means more, not as much


def test_no_evaluation_or_another_incumbent_keeps_the_alias() -> None:
    empty = aliases.judge({"num_labelled": 0, "base": {}, "adapter": {}}, "job-4", "production", "job-1")
    assert not empty.promoted and "no held-out evaluation" in empty.message and empty.hint
    assert not aliases.judge({}, "job-4", "production", None).promoted  # no training_info.json at all
    moved = aliases.judge(metrics(0.9, 0.3, ("job-1", 0.6)), "job-5", "production", "job-2")  # moved meanwhile
    assert not moved.promoted and "not evaluated against job-2" in moved.message and "job-1" in moved.message
    unloaded = {**metrics(0.9, 0.3), "incumbent": {"name": "job-2", "error": "job-2 has no adapter_model.safetensors"}}
    failed = aliases.judge(unloaded, "job-5", "production", "job-2")
    assert not failed.promoted and "no adapter_model.safetensors" in failed.message
    missing = aliases.judge(metrics(0.9, 0.3), "job-5", "production", "job-2")  # not compared at all
    assert not missing.promoted and "could not be evaluated beside it" in missing.message


def test_alias_names() -> None:
    assert check_alias_name("production") == "production" and check_alias_name("prod.v2_b-1") == "prod.v2_b-1"
    for bad in ("latest", "none", "job-12", "", "1st", "a b", "x" * 65, "prod\n", "../x"):
        with pytest.raises(ValueError):
            check_alias_name(bad)
    with pytest.raises(RequestError) as raised:
        aliases.checked_name("job-3")
    assert raised.value.status == 422 and raised.value.details[0]["field"] == "alias"
    assert JobCreate.model_validate({"dataset": "builtin", "promote_to": "production"}).promote_to == "production"


# ------------------------------------------------------------------------------------------- with a database
def succeeded_job(engine: Engine, settings: Settings, evaluation: dict[str, Any] | None, promote_to: str | None) -> Job:
    """A succeeded job with a published adapter folder holding ``evaluation`` as training_info.json's metrics."""
    with session_scope(engine) as session:
        job = Job(base_model="builtin", dataset="builtin", hyperparameters={}, status=JobStatus.succeeded)
        session.add(job)
        session.flush()
        assert job.id is not None
        job.adapter = f"job-{job.id}"
        if promote_to:
            aliases.request_promotion(session, job.id, promote_to)
    folder = settings.layout.adapter_dir(f"job-{job.id}")
    folder.mkdir(parents=True)
    if evaluation is not None:
        (folder / "training_info.json").write_text(json.dumps({"metrics": evaluation}))
    return job


def decide(engine: Engine, settings: Settings, job: Job) -> Promotion | None:
    assert job.id is not None and job.adapter is not None
    with session_scope(engine) as session:
        return aliases.decide(session, settings, job.id, job.adapter)


def test_decide_moves_the_alias_only_for_a_better_adapter(engine: Engine, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = succeeded_job(engine, settings, metrics(0.7, 0.3), "production")
    promotion = decide(engine, settings, first)
    assert promotion is not None and promotion.status == "promoted"
    assert decide(engine, settings, first) is None  # decided once
    worse = succeeded_job(engine, settings, metrics(0.5, 0.3, (str(first.adapter), 0.7)), "production")
    kept = decide(engine, settings, worse)
    assert kept is not None and kept.status == "kept" and kept.reason and "does not beat" in kept.reason
    unasked = succeeded_job(engine, settings, metrics(0.99, 0.3), None)
    assert decide(engine, settings, unasked) is None
    with session_scope(engine, read_only=True) as session:
        row = aliases.get(session, "production")
        assert row is not None and row.adapter == first.adapter and row.reason.startswith(f"promoted by job {first.id}")
        found = session.exec(select(JobEvent).where(col(JobEvent.type) == "promotion").order_by(col(JobEvent.id))).all()
        assert [(e.job_id, e.data["promoted"], e.level) for e in found] == [
            (first.id, True, "info"),
            (worse.id, False, "warning"),
        ]
        assert aliases.incumbent(session, settings, worse) == (
            first.adapter,
            settings.layout.adapter_dir(str(first.adapter)),
        )
        assert aliases.incumbent(session, settings, unasked) is None  # it asked for no promotion


def test_point_remove_and_latest(engine: Engine, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    evaluated = succeeded_job(engine, settings, metrics(0.7, 0.3), None)
    unevaluated = succeeded_job(engine, settings, {"num_labelled": 0, "base": {}, "adapter": {}}, None)
    with session_scope(engine) as session:
        latest = aliases.latest_evaluated(session, settings)
        assert latest is not None and latest.id == evaluated.id  # the newer one has no evaluation
        aliases.point(session, settings, alias="production", job=evaluated, reason="by hand")
        aliases.point(session, settings, alias="production", job=unevaluated, reason="by hand again")
        aliases.point(session, settings, alias="staging", job=unevaluated, reason="try it")
        assert aliases.names_for(session, str(unevaluated.adapter)) == ["production", "staging"]
        other = Job(id=evaluated.id, base_model="another-base", dataset="builtin", hyperparameters={}, adapter="job-x")
        with pytest.raises(RequestError) as raised:
            aliases.point(session, settings, alias="production", job=other, reason="")
        assert raised.value.status == 409
    with session_scope(engine) as session:
        assert aliases.remove(session, "staging") is not None and aliases.remove(session, "staging") is None
        assert aliases.get(session, "prod\x00") is None and aliases.remove(session, "../x") is None  # no query made
        assert [(a.name, a.adapter) for a in aliases.list_all(session)] == [("production", unevaluated.adapter)]
        query = select(JobEvent.message).where(col(JobEvent.type) == "alias").order_by(col(JobEvent.id))
        messages = session.exec(query).all()
        assert (
            messages[1] == f"alias production points at {unevaluated.adapter} (was {evaluated.adapter}): by hand again"
        )
