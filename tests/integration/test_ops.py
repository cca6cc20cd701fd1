"""Operations: Prometheus /metrics, Server-Sent Events for job events, and the deployment files (compose.yaml)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Service

FAMILIES = {
    "flashtune_jobs": "gauge",
    "flashtune_queue_depth": "gauge",
    "flashtune_queue_wait_seconds": "gauge",
    "flashtune_training_tokens_per_second": "gauge",
    "flashtune_analyze_latency_seconds": "histogram",
    "flashtune_analyze_batch_size": "histogram",
    "flashtune_loaded_adapters": "gauge",
}


def read_sse(service: Service, job_id: int, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every message of the stream until the server closes it, as {"id", "event", "data"} dicts."""
    messages: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    url = f"/jobs/{job_id}/events"
    with service.client.stream("GET", url, params={"stream": "true"}, headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    messages.append({"event": "message", **current, "data": json.loads(current["data"])})
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                current[name] = value.removeprefix(" ")
    return messages


def scrape(service: Service) -> dict[str, Any]:
    response = service.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float | None:
    family_name = sample_name.removesuffix("_count").removesuffix("_sum")
    for sample in families[family_name].samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


@pytest.mark.slow
def test_metrics_and_event_stream_of_a_job(service: Service) -> None:
    families = scrape(service)
    for name, kind in FAMILIES.items():
        assert families[name].type == kind, name
    assert value(families, "flashtune_jobs", status="queued") == 0

    job = service.post_job(name="ops", hyperparameters={"epochs": 1})
    # While the job trains, its throughput shows up per job (progress is written every 0.3 s in tests).
    seen_speed = False
    while not seen_speed and service.job(job["id"])["status"] in ("queued", "running"):
        seen_speed = value(scrape(service), "flashtune_training_tokens_per_second", job_id=str(job["id"])) is not None
        time.sleep(0.2)
    assert seen_speed, "the running job never reported tokens/s in /metrics"

    messages = read_sse(service, job["id"])  # follows the job live until it ends
    events, end = messages[:-1], messages[-1]
    assert end == {"event": "end", "data": {"status": "succeeded"}}
    types = [m["data"]["type"] for m in events]
    assert types[0] == "queued" and types[-1] == "succeeded", types
    assert types.index("started") < types.index("succeeded")
    ids = [int(m["id"]) for m in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [m["data"]["id"] for m in events] == ids
    page = service.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()
    assert [e["id"] for e in page["data"]] == ids, "the stream and the paged list disagree"

    # A reconnect with Last-Event-ID gets only what came after that event.
    cut = ids[types.index("started")]
    resumed = read_sse(service, job["id"], {"Last-Event-ID": str(cut)})
    assert [int(m["id"]) for m in resumed[:-1]] == [i for i in ids if i > cut]
    assert resumed[-1]["event"] == "end"

    analyzed = service.client.post("/analyze", json={"text": "美联储宣布加息25个基点", "max_new_tokens": 0})
    assert analyzed.status_code == 200, analyzed.text
    families = scrape(service)
    assert value(families, "flashtune_jobs", status="succeeded") == 1
    assert value(families, "flashtune_queue_depth") == 0
    assert value(families, "flashtune_analyze_latency_seconds_count") == 1
    assert value(families, "flashtune_analyze_batch_size_count") == 1
    assert value(families, "flashtune_loaded_adapters") == 1


def test_event_stream_errors_and_cancel(service: Service) -> None:
    assert service.client.get("/jobs/999/events", params={"stream": "true"}).status_code == 404
    job = service.post_job(hyperparameters={"epochs": 1})
    bad = service.client.get(f"/jobs/{job['id']}/events", params={"stream": "true"}, headers={"Last-Event-ID": "x"})
    # the schema's pattern refuses it first: the field is named as FastAPI names a header (header.last-event-id)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"].lower().endswith("last-event-id")
    assert service.client.post(f"/jobs/{job['id']}/cancel").status_code == 200
    messages = read_sse(service, job["id"])  # a cancelled job is final: the stream ends
    assert messages[-1] == {"event": "end", "data": {"status": "cancelled"}}
    assert "cancelled" in [m["data"].get("type") for m in messages[:-1]]


def run_compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "docker" / "check_compose.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = run_compose_check(ROOT / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The check is not vacuous: a misspelt key is caught and named.
    broken = (ROOT / "compose.yaml").read_text().replace("    healthcheck:", "    healthchek:", 1)
    (tmp_path / "compose.yaml").write_text(broken)
    result = run_compose_check(tmp_path / "compose.yaml")
    assert result.returncode != 0 and "healthchek" in result.stdout + result.stderr
