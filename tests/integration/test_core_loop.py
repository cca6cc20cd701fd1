"""The core loop against real processes: queue a builtin job, watch it train, serve and analyze the adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.llm.builtin.data import builtin_dataset
from service.llm.builtin.model import builtin_path
from tests.conftest import Service, make_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path
) -> Iterator[tuple[Service, dict[str, Any], list[dict[str, Any]]]]:
    """One service with one builtin job trained to completion, and the progress snapshots seen while it ran."""
    svc = make_service(tmp_path_factory.mktemp("core"), builtin_model_cache)
    job = svc.post_job()
    assert job["status"] == "queued"
    seen = []
    deadline = time.monotonic() + 900  # a loaded 2-core machine trains 5-10x slower
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = svc.job(job["id"])
        if job["status"] == "running":
            seen.append(job["progress"])
        time.sleep(0.2)
    assert job["status"] == "succeeded", (job, svc.logs())
    yield svc, job, seen
    svc.stop()


def test_job_reports_progress_while_running(trained: tuple[Service, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, job, seen = trained
    steps = [p["step"] for p in seen if p.get("total_steps")]
    assert len(set(steps)) >= 3, seen  # several distinct steps were observed mid-run
    middle = next(p for p in seen if 0 < p["step"] < p["total_steps"])
    assert middle["total_epochs"] == job["hyperparameters"]["epochs"]
    assert 0 < middle["fraction"] < 1 and middle["loss"] is not None and middle["learning_rate"] is not None
    assert middle["tokens_per_second"] > 0 and middle["eta_seconds"] is not None
    assert any(p["epoch"] > 1 for p in seen)
    assert job["progress"]["step"] == job["progress"]["total_steps"]
    assert job["adapter"] == f"job-{job['id']}" and job["error"] is None and job["attempts"] == 1
    assert job["started_at"] and job["finished_at"]


def test_events_cover_the_job_lifecycle(trained: tuple[Service, dict[str, Any], list[dict[str, Any]]]) -> None:
    svc, job, _ = trained
    events = svc.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()
    types = [e["type"] for e in events["data"]]
    for expected in ("queued", "started", "setup", "epoch", "checkpoint", "evaluation", "succeeded"):
        assert expected in types, types
    setup = next(e for e in events["data"] if e["type"] == "setup")
    assert "LoRA" in setup["message"] and setup["data"]["quantization"] == "none"  # CPU: plain LoRA, and why


def test_adapter_files_load_with_peft(trained: tuple[Service, dict[str, Any], list[dict[str, Any]]]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    svc, job, _ = trained
    folder = svc.data_dir / "adapters" / job["adapter"]
    assert {"adapter_model.safetensors", "adapter_config.json", "training_info.json"} <= {
        p.name for p in folder.iterdir()
    }
    info = json.loads((folder / "training_info.json").read_text())
    assert info["hyperparameters"]["epochs"] == job["hyperparameters"]["epochs"]
    assert info["device"] == "cpu" and info["versions"]["peft"] and info["losses"]["epoch_loss"]
    assert info["base_model"] == "builtin"  # the public name: no path of the server leaves with the adapter
    base = AutoModelForCausalLM.from_pretrained(builtin_path(svc.data_dir))
    model = PeftModel.from_pretrained(base, str(folder))
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and any(float(p.abs().sum()) > 0 for p in lora)  # lora_B starts at zero: it trained
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == base.config.vocab_size

    listed = svc.client.get("/adapters").json()
    assert [a["name"] for a in listed] == [job["adapter"]]
    detail = svc.client.get(f"/adapters/{job['adapter']}").json()
    assert detail["metrics"]["adapter"]["accuracy"] >= 0.9
    archive = svc.client.get(f"/adapters/{job['adapter']}/download")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/gzip"


def test_analyze_adapter_beats_base_on_held_out(trained: tuple[Service, dict[str, Any], list[dict[str, Any]]]) -> None:
    svc, job, _ = trained
    _, held_out = builtin_dataset()
    correct = {"latest": 0, "none": 0}
    for example in held_out:
        for adapter in correct:
            result = svc.client.post("/analyze", json={"text": example.input, "adapter": adapter, "max_new_tokens": 0})
            assert result.status_code == 200, result.text
            correct[adapter] += result.json()["label"] == example.label
    assert correct["latest"] / len(held_out) >= 0.9, correct
    assert correct["none"] / len(held_out) < 0.6, correct


def test_analyze_contract_with_curl(trained: tuple[Service, dict[str, Any], list[dict[str, Any]]]) -> None:
    svc, job, _ = trained
    if shutil.which("curl") is None:
        pytest.fail("curl is required for this test")
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"{svc.url}/analyze",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps({"text": "美联储宣布加息25个基点"}, ensure_ascii=False),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    body = json.loads(out.stdout)
    assert body["label"] == "bearish" and body["label_id"] == -1
    assert set(body["probs"]) == {"bearish", "neutral", "bullish"}
    assert abs(sum(body["probs"].values()) - 1) < 1e-3 and body["score"] == body["probs"]["bearish"]
    assert body["adapter"] == job["adapter"] and body["base_model"] == "builtin"
    assert body["importance"] == 5 and body["market_reaction"] == "下跌"
    assert "利空" in body["analysis"] and body["latency_ms"] > 0

    listed = subprocess.run(["curl", "-sS", f"{svc.url}/jobs?status=succeeded"], capture_output=True, check=True)
    assert [j["id"] for j in json.loads(listed.stdout)["data"]] == [job["id"]]


def test_failing_job_reports_why_and_worker_takes_next(
    trained: tuple[Service, dict[str, Any], list[dict[str, Any]]],
) -> None:
    svc, _, _ = trained
    bad = svc.post_job(hyperparameters={"target_modules": ["no_such_layer"], "epochs": 1})
    good = svc.post_job(hyperparameters={"epochs": 1})
    failed = svc.wait(bad["id"])
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "invalid_hyperparameters"
    assert "no_such_layer" in failed["error"]["message"] and "q_proj" in failed["error"]["hint"]
    assert svc.wait(good["id"])["status"] == "succeeded"
    # the newest adapter is served from now on, without a restart
    latest = svc.client.post("/analyze", json={"text": "美联储维持利率不变", "max_new_tokens": 0}).json()
    assert latest["adapter"] == f"job-{good['id']}"


def test_cancel_running_job(service: Service) -> None:
    job = service.post_job(hyperparameters={"epochs": 50})
    running = service.wait(job["id"], ("running",), timeout=120)
    while running["progress"].get("step", 0) < 2:
        running = service.job(job["id"])
        time.sleep(0.1)
    cancelled = service.client.post(f"/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    step_at_cancel = service.job(job["id"])["progress"]["step"]
    time.sleep(3)
    after = service.job(job["id"])
    assert after["status"] == "cancelled" and after["progress"]["step"] <= step_at_cancel + 1
    assert service.client.post(f"/jobs/{job['id']}/cancel").status_code == 409
    # the worker is free again: the next job runs
    nxt = service.post_job(hyperparameters={"epochs": 1})
    assert service.wait(nxt["id"])["status"] == "succeeded"
