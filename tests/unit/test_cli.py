"""The command line's parts that need no process: phases and progress lines of a watched job, table cells, the
one-line settings errors, the per-user DATA_DIR, and the workers' heartbeat rows (on SQLite and PostgreSQL).

The commands as processes (exit codes, no tracebacks, output that is not a terminal): tests/integration/test_cli.py.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import Engine
from typer.testing import CliRunner

from service.cli import _settings, app
from service.cli_client.follow import LineView, phase
from service.cli_client.output import cell
from service.core.config import Settings
from service.jobs import jobstore
from service.jobs import workers as presence
from service.jobs.db import session_scope
from service.jobs.models import Job, utcnow


def job(status: str, step: int = 0, total: int = 0) -> dict[str, Any]:
    progress = {"step": step, "total_steps": total, "epoch": 0.5, "total_epochs": 1, "loss": 0.25}
    return {"id": 7, "status": status, "attempts": 0, "max_attempts": 3, "base_model": "builtin", "progress": progress}


# ---------------------------------------------------------------------------------------------------- phases
def test_a_job_without_steps_shows_a_phase_never_step_0_of_0() -> None:
    assert phase(job("queued"), "queued") == "waiting for a worker"
    assert "attempt 2 of 3" in (phase({**job("queued"), "attempts": 1}, "retrying") or "")
    started = phase(job("running"), "started") or ""
    assert started.startswith("preparing") and "built-in model" in started
    assert phase(job("running"), "setup") == "loading the base model"
    assert phase(job("running"), "dataset") == "starting training"
    assert phase(job("running", 3, 10), "started") == "preparing: reading the dataset, finding the base model" + (
        " (the built-in model is built on its first use, ~30 s)"
    )  # a retry: the earlier attempt's progress is not this attempt's
    assert phase(job("running", 3, 10), "checkpoint") is None  # training: the bar shows steps
    assert (phase(job("running", 10, 10), "epoch") or "").startswith("evaluating")
    assert phase(job("running", 10, 10), "published") == "publishing the adapter"
    assert phase(job("succeeded", 10, 10), "succeeded") is None


def test_plain_progress_lines_for_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    view = LineView(7)
    for state, last in [(job("queued"), "queued")] * 3 + [(job("running"), "setup")]:
        view.update(state, phase(state, last))
    for step in range(1, 21):
        view.update(job("running", step, 20), None)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["job 7: waiting for a worker", "job 7: loading the base model"]  # each phase once
    steps = [line for line in lines if ": step " in line]
    assert steps[0].startswith("job 7: step 1/20 (5%)  epoch 0.50/1  loss 0.2500")
    assert len(steps) == 11 and steps[-1].startswith("job 7: step 20/20 (100%)")  # every 10%, not every poll
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_cells_have_no_python_reprs() -> None:
    assert cell(None) == "-" and cell([]) == "-" and cell({}) == "-" and cell(True) == "yes"
    assert cell({"bearish": 3, "neutral": 1}) == "bearish 3, neutral 1"
    assert cell(["a", None]) == "a, -" and cell(0.123456) == "0.1235"
    shown = cell("2026-01-02T03:04:05.123456")
    assert len(shown) == 19 and shown[4] == "-" and "T" not in shown


# -------------------------------------------------------------------------------------------------- settings
def test_a_bad_setting_is_one_line_naming_its_variable_or_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLASHTUNE_PORT", "eighty")
    monkeypatch.setenv("FLASHTUNE_LEASE_SECONDS", "soon")
    with pytest.raises(typer.Exit) as info:
        _settings()
    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: invalid FLASHTUNE_PORT='eighty': Input should be a valid integer, unable to parse string as an integer",
        "error: invalid FLASHTUNE_LEASE_SECONDS='soon': Input should be a valid number, unable to parse string as a "
        "number",
    ]
    monkeypatch.delenv("FLASHTUNE_PORT")
    monkeypatch.delenv("FLASHTUNE_LEASE_SECONDS")
    with pytest.raises(typer.Exit):
        _settings(gpus="zero")
    assert capsys.readouterr().err.startswith("error: invalid --gpus='zero': String should match pattern")


def test_data_dir_defaults_to_one_folder_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLASHTUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert Settings().data_dir == tmp_path / "xdg" / "flashtune"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings().data_dir == tmp_path / "home" / ".local" / "share" / "flashtune"
    assert Settings(data_dir=Path("relative")).data_dir == tmp_path / "relative"  # absolute: the logs name it


def test_version_and_bad_json_need_no_server() -> None:
    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("flashtune ")
    bad = runner.invoke(app, ["jobs", "submit", "--hyperparameters", "{"])
    assert bad.exit_code == 2 and "--hyperparameters" in bad.output and "not valid JSON" in bad.output


# --------------------------------------------------------------------------------------------------- workers
def queue_one(engine: Engine) -> None:
    with session_scope(engine) as session:
        jobstore.create(session, Job(base_model="builtin", dataset="builtin", hyperparameters={}))


def test_no_worker_seen_while_jobs_wait(engine: Engine) -> None:
    with session_scope(engine) as session:
        assert presence.presence(session, 60).notice is None  # nothing waits: nothing to say
    queue_one(engine)
    with session_scope(engine) as session:
        state = presence.presence(session, 60)
    assert state.alive == 0 and state.runnable_jobs == 1 and state.last_seen_seconds is None
    assert state.notice and state.notice.startswith("no worker has been seen by this database; 1 job waits")

    with session_scope(engine) as session:
        presence.beat(session, "w-1")
        presence.beat(session, "w-1")  # the second beat updates the one row
    with session_scope(engine) as session:
        (row,) = presence.list_workers(session, 60)
        assert row.state == "alive" and row.id == "w-1" and presence.presence(session, 60).notice is None
        later = utcnow() + timedelta(seconds=75)
        assert presence.list_workers(session, 60, later)[0].state == "lost"
        notice = presence.presence(session, 60, later).notice
        assert notice and notice.startswith("no worker has been seen for 75 s; 1 job waits")

    with session_scope(engine) as session:
        presence.stop(session, "w-1")
    with session_scope(engine) as session:
        assert presence.list_workers(session, 60)[0].state == "stopped"
        assert presence.presence(session, 60).alive == 0


def test_the_heartbeat_thread_beats_and_marks_the_worker_stopped(engine: Engine) -> None:
    heartbeat = presence.Heartbeat(engine, "w-thread", every=0.05)
    heartbeat.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            rows = presence.list_workers(session, 60)
        if rows:
            break
        time.sleep(0.05)
    first = rows[0].last_seen_at
    time.sleep(0.3)
    with session_scope(engine) as session:
        assert presence.list_workers(session, 60)[0].last_seen_at > first  # still beating
    heartbeat.finish()
    assert not heartbeat.is_alive()
    with session_scope(engine) as session:
        assert presence.list_workers(session, 60)[0].state == "stopped"
