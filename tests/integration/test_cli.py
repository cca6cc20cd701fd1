"""The ``flashtune`` command line as a user runs it, against real ``flashtune serve`` / ``flashtune worker`` processes.

Every command runs as a process of its own with its output captured, so none of it is a terminal: the tests also
check what a log or CI sees (plain lines, no progress bar redraws, no escape codes). Checked: exit codes (0 done,
1 refused / unreachable / the watched job failed or was cancelled, 2 a bad option), one-line errors without a
traceback, the phases a watched job shows (waiting for a worker, loading, training, evaluating; never step 0/0),
the workers' heartbeat rows (alive, stopped, "no worker has been seen for N s"), and the per-user DATA_DIR that
serve and worker started from different folders share.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.datasets.sample import SampleData
from tests.conftest import Service, free_port, make_service, seed_builtin, wait_for

TINY_TRAINING = '{"epochs": 2, "batch_size": 4, "max_length": 128}'


def flashtune(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``flashtune ARGS`` as a process (output captured: not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command's stdout + stderr, checked: this exit code, no traceback, no terminal escape codes or redraws."""
    output = result.stdout + result.stderr
    assert result.returncode == code, f"exit {result.returncode} (wanted {code})\n{output}"
    assert "Traceback" not in output and "\x1b[" not in output and "\r" not in output, output
    return output


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- no server needed
def test_errors_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    unreachable = flashtune("jobs", "list", "--url", url)
    clean(unreachable, 1)
    (line,) = error_lines(unreachable)
    assert url in line and "flashtune serve" in line, line

    bad_json = flashtune("jobs", "submit", "--url", url, "--hyperparameters", '{"epochs": 2')
    assert "--hyperparameters" in clean(bad_json, 2) and "not valid JSON" in bad_json.stderr
    not_object = flashtune("jobs", "submit", "--url", url, "--hyperparameters", "[2]")
    assert "must be a JSON object" in clean(not_object, 2)

    missing = flashtune("datasets", "upload", str(tmp_path / "missing.jsonl"), "--url", url)
    assert "does not exist" in clean(missing, 2)

    version = flashtune("--version")
    assert clean(version, 0).startswith("flashtune ")


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("serve", "FLASHTUNE_PORT", "eighty"),
        ("worker", "FLASHTUNE_LEASE_SECONDS", "soon"),
        ("worker", "FLASHTUNE_ALLOWED_MODEL_ROOTS", "[not json"),  # a JSON setting that does not even parse
    ],
)
def test_a_bad_setting_names_its_variable(tmp_path: Path, command: str, variable: str, value: str) -> None:
    result = flashtune(command, env={"FLASHTUNE_DATA_DIR": str(tmp_path), variable: value})
    clean(result, 1)
    (line,) = error_lines(result)
    assert line.startswith(f"error: invalid {variable}"), line


# ------------------------------------------------------------------------------------------ an API, no worker
@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[Service]:
    svc = make_service(tmp_path_factory.mktemp("cli-api"), builtin_model_cache, workers=0)
    yield svc
    svc.stop()


def test_a_queued_job_without_a_worker_says_so_and_cancelling_ends_the_watch(api_only: Service) -> None:
    url = ("--url", api_only.url)
    submitted = flashtune("jobs", "submit", *url, "--name", "lonely", "--json")
    output = clean(submitted, 0)
    assert "no worker has been seen by this database" in output and "flashtune worker" in output, output
    job_id = int(submitted.stdout.split('"id": ')[1].split(",")[0])
    presence = api_only.client.get("/readyz").json()["workers"]
    assert presence["alive"] == 0 and presence["runnable_jobs"] >= 1 and presence["last_seen_seconds"] is None
    assert "no worker has been seen" in presence["notice"]

    log = api_only.data_dir / "watch.log"
    with log.open("w") as handle:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "jobs", "watch", str(job_id), *url], stdout=handle, stderr=handle
        )
    wait_for(lambda: "waiting for a worker" in log.read_text(), 120, "the watch to start")
    clean(flashtune("jobs", "cancel", str(job_id), *url), 0)
    assert watcher.wait(60) == 1, log.read_text()
    watched = log.read_text()
    assert "Traceback" not in watched and "\r" not in watched and "\x1b[" not in watched, watched
    assert "no worker has been seen" in watched and f"job {job_id} was cancelled" in watched, watched
    assert "step 0/0" not in watched


def test_tables_have_no_python_reprs(api_only: Service, sample_data: SampleData) -> None:
    url = ("--url", api_only.url)
    uploaded = clean(flashtune("datasets", "upload", str(sample_data.instructions_test), *url), 0)
    assert "ds-" in uploaded
    for command in (("jobs", "list"), ("datasets", "list"), ("adapters", "list"), ("workers",)):
        output = clean(flashtune(*command, *url), 0)
        for repr_ in ("None", "{'", "[]", "{}", "datetime("):
            assert repr_ not in output, (command, output)
    missing = flashtune("jobs", "show", "999999", *url)
    assert "404" in clean(missing, 1) and "999999" in missing.stderr


# -------------------------------------------------------------------------------------- an API and a worker
@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path, sample_data: SampleData
) -> Iterator[tuple[Service, str, subprocess.CompletedProcess[str]]]:
    """A service with a worker, and a job on a ten-line dataset submitted with ``--watch`` to its end."""
    svc = make_service(tmp_path_factory.mktemp("cli-train"), builtin_model_cache)
    upload = flashtune("datasets", "upload", str(sample_data.instructions_test), "--url", svc.url, "--json")
    dataset = upload.stdout.split('"id": "')[1].split('"')[0]
    watched = flashtune(
        "jobs", "submit", "--url", svc.url, "--dataset", dataset, "--hyperparameters", TINY_TRAINING, "--watch",
        timeout=900,
    )  # fmt: skip
    yield svc, dataset, watched
    svc.stop()


def test_watch_shows_phases_then_steps_and_exits_0(trained: tuple[Service, str, Any]) -> None:
    svc, _, watched = trained
    output = clean(watched, 0)
    lines = watched.stderr.splitlines()
    assert any(line.endswith("waiting for a worker") or "preparing" in line for line in lines), output
    assert any("loading the base model" in line for line in lines), output
    steps = [line for line in lines if ": step " in line]
    assert steps and "step 0/0" not in output, output
    total = steps[-1].split(": step ")[1].split()[0]
    assert total.split("/")[0] == total.split("/")[1], steps  # the last step line is the last step
    assert "succeeded in" in watched.stderr and "succeeded" in watched.stdout, output


def test_workers_and_adapters_commands(trained: tuple[Service, str, Any], tmp_path: Path) -> None:
    svc, _, watched = trained
    url = ("--url", svc.url)
    adapter = watched.stderr.split("adapter ")[-1].split()[0]
    assert adapter.startswith("job-"), watched.stderr
    workers = clean(flashtune("workers", *url), 0)
    assert " alive " in workers, workers
    events = clean(flashtune("jobs", "events", adapter.removeprefix("job-"), *url), 0)
    for kind in ("queued", "started", "setup", "evaluation", "succeeded"):
        assert f" {kind} " in events, events
    listed = clean(flashtune("adapters", "list", *url), 0)
    assert adapter in listed and "->" in listed, listed  # held-out scores: base -> adapter
    shown = clean(flashtune("adapters", "show", adapter, *url), 0)
    assert "adapter_model.safetensors" in shown, shown
    target = tmp_path / "adapter.tar.gz"
    clean(flashtune("adapters", "download", adapter, "-o", str(target), *url), 0)
    with tarfile.open(target) as archive:
        assert any(name.endswith("adapter_config.json") for name in archive.getnames())
    again = flashtune("adapters", "download", adapter, "-o", str(target), *url)
    assert "--force" in clean(again, 2)
    analyzed = clean(
        flashtune("analyze", "美联储宣布加息25个基点", "--adapter", adapter, "--max-new-tokens", "0", *url), 0
    )
    assert f"adapter {adapter}" in analyzed, analyzed


def test_alias_then_analyze_through_it(trained: tuple[Service, str, Any]) -> None:
    svc, _, watched = trained
    url = ("--url", svc.url)
    adapter = watched.stderr.split("adapter ")[-1].split()[0]
    pointed = flashtune("adapters", "alias", "staging", adapter, *url)
    assert f"staging: unset -> {adapter}" in clean(pointed, 0)
    analyzed = clean(
        flashtune("analyze", "欧洲央行宣布降息50个基点", "--adapter", "staging", "--max-new-tokens", "0", *url), 0
    )
    assert f"adapter {adapter} (alias staging)" in analyzed, analyzed
    promoted = flashtune("adapters", "promote", adapter, "--to", "production", *url)
    assert f"production: unset -> {adapter}" in clean(promoted, 0)


def test_a_failed_job_exits_1_with_its_error_and_hint(trained: tuple[Service, str, Any]) -> None:
    svc, dataset, _ = trained
    bad = '{"target_modules": ["no_such_layer"], "epochs": 1}'
    result = flashtune(
        "jobs", "submit", "--url", svc.url, "--dataset", dataset, "--hyperparameters", bad, "--watch", timeout=600
    )
    clean(result, 1)
    assert "failed after" in result.stderr and "hint: " in result.stderr, result.stderr
    assert "failed" in result.stdout  # the job's row on stdout still


def test_a_stopped_worker_is_seen_stopped_and_queued_jobs_say_for_how_long(trained: tuple[Service, str, Any]) -> None:
    svc, dataset, _ = trained
    url = ("--url", svc.url)
    for proc in svc.workers:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert " stopped " in clean(flashtune("workers", *url), 0)
    queued = clean(flashtune("jobs", "submit", *url, "--dataset", dataset), 0)
    assert "no worker has been seen for " in queued, queued


# ------------------------------------------------------------------------------------ one DATA_DIR per user
def test_serve_and_worker_from_different_folders_share_the_per_user_data_dir(
    tmp_path: Path, builtin_model_cache: Path
) -> None:
    home = tmp_path / "xdg"
    seed_builtin(home / "flashtune", builtin_model_cache)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FLASHTUNE_DATA_DIR"}
    env |= {"XDG_DATA_HOME": str(home), "FLASHTUNE_PORT": str(port), "FLASHTUNE_HEARTBEAT_SECONDS": "0.5"}
    procs = []
    try:
        for command, folder in ((["serve", "--log-level", "warning"], "a"), (["worker"], "b")):
            (tmp_path / folder).mkdir()
            log = (tmp_path / f"{folder}.log").open("w")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.cli", *command],
                    env=env,
                    cwd=tmp_path / folder,
                    stdout=log,
                    stderr=log,
                )
            )
        url = f"http://127.0.0.1:{port}"

        def worker_seen() -> bool:
            try:
                return any(w["state"] == "alive" for w in httpx.get(f"{url}/workers").json())
            except (httpx.TransportError, ValueError):
                return False

        wait_for(worker_seen, 300, "the worker to show up in the API's database")
        assert (home / "flashtune" / "flashtune.db").exists()
        assert not any((tmp_path / folder / "flashtune-data").exists() for folder in ("a", "b"))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    time.sleep(0)  # nothing left running
