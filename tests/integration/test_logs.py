"""Structured logs: with FLASHTUNE_LOG_JSON=true (or --log-json) ``flashtune serve`` and ``flashtune worker`` write
one JSON object per line, with the request id (the client's X-Request-ID, or a generated one, echoed back) on the
API's lines and the job id on the worker's lines about a job. Real processes, no mocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import Service, seed_builtin, wait_for

KEYS = ("timestamp", "level", "logger", "message")


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log file that is a JSON object (the worker's file also gets what libraries print)."""
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def test_serve_and_worker_write_json_lines_with_request_and_job_ids(tmp_path: Path, builtin_model_cache: Path) -> None:
    seed_builtin(tmp_path, builtin_model_cache)
    svc = Service(tmp_path, env={"FLASHTUNE_LOG_JSON": "true"})
    try:
        svc.start_api(log_level="info")
        mine = svc.client.get("/jobs", headers={"X-Request-ID": "dash-test.42"})
        assert mine.status_code == 200 and mine.headers["x-request-id"] == "dash-test.42"
        generated = svc.client.get("/jobs/999999").headers["x-request-id"]  # a 404, with an id made up for it
        assert generated and generated != "dash-test.42"
        unsafe = svc.client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
        assert unsafe != "bad id with spaces"  # not a safe token: replaced, never written to the log as sent

        api_log = tmp_path / "api.log"
        wait_for(lambda: generated in api_log.read_text(), 10, "the access line of the 404", svc)
        lines = [line for line in api_log.read_text().splitlines() if line.strip()]
        entries = [json.loads(line) for line in lines]  # every line of the API's log is one JSON object
        for entry in entries:
            assert all(key in entry for key in KEYS), entry
            assert entry["timestamp"].endswith("Z") and "T" in entry["timestamp"]
        by_id = {e.get("request_id"): e for e in entries if e["logger"] == "uvicorn.access"}
        assert by_id["dash-test.42"]["path"] == "/jobs" and by_id["dash-test.42"]["status"] == 200
        assert by_id[generated]["status"] == 404 and by_id[generated]["method"] == "GET"
        assert any(e["logger"] == "uvicorn.error" and "startup complete" in e["message"] for e in entries)

        # The worker: --log-json on the command line, not from the environment.
        del svc.env["FLASHTUNE_LOG_JSON"]
        job = svc.post_job(hyperparameters={"epochs": 50})
        svc.start_worker("--log-json")
        worker_log = tmp_path / "worker-0.log"
        svc.wait(job["id"], ("running",), timeout=120)

        def about_job() -> list[dict[str, Any]]:
            return [e for e in json_lines(worker_log) if e.get("job_id") == job["id"]]

        wait_for(lambda: any(e["message"].startswith("running job") for e in about_job()), 30, "'running job'", svc)
        assert svc.client.post(f"/jobs/{job['id']}/cancel").status_code == 200
        wait_for(lambda: any("lease lost" in e["message"] for e in about_job()), 60, "the lease-lost line", svc)
        worker_entries = json_lines(worker_log)
        assert all(all(key in e for key in KEYS) for e in worker_entries)
        started = [e for e in worker_entries if e["message"].startswith("worker ") and "started" in e["message"]]
        assert started and "job_id" not in started[0]  # only lines about a job carry its id
    finally:
        svc.stop()
