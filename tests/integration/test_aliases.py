"""Aliases and the promotion gate against real ``flashtune serve`` and ``flashtune worker`` processes.

The user's local Agent calls ``/analyze`` with ``adapter: "production"`` (and, with ``FLASHTUNE_DEFAULT_ADAPTER=
production``, with no adapter at all). Small trainings: a job on the built-in data that asks to be promoted and beats
the base; a worse one (a learning rate too small to learn, on a small upload) that asks and is refused, production
staying and the event saying why; a job with no held-out evaluation, which neither moves production nor becomes
'latest'. The tests share one service and run in order.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.llm.builtin.data import builtin_dataset
from service.llm.prompts import Example
from tests.conftest import Service, make_service

pytestmark = pytest.mark.slow
TEXT = "美联储宣布加息25个基点"
BETTER = {"epochs": 1, "learning_rate": 1e-2}  # one epoch of the built-in data: far above the base's macro-F1
WEAK = {"epochs": 1, "learning_rate": 1e-6, "validation_fraction": 0.5}  # the LoRA B matrices stay ~0: the base


def upload(svc: Service, examples: list[Example], name: str) -> str:
    lines = [json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) for e in examples]
    response = svc.client.post("/datasets", files={"file": (name, io.BytesIO("\n".join(lines).encode()))})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[Service]:
    service = make_service(
        tmp_path_factory.mktemp("aliases"), builtin_model_cache, env={"FLASHTUNE_DEFAULT_ADAPTER": "production"}
    )
    yield service
    service.stop()


def agent_call(svc: Service, **extra: Any) -> dict[str, Any]:
    """What the user's Agent sends: its news item, the production model, label-only, in the Agent's own shape."""
    body = {"text": TEXT, "adapter": "production", "format": "agent", "max_new_tokens": 0, **extra}
    response = svc.client.post("/analyze", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 200, response.text
    return dict(response.json())


def succeeded(svc: Service, **body: Any) -> dict[str, Any]:
    job = svc.wait(svc.post_job(**body)["id"])
    assert job["status"] == "succeeded", (job, svc.logs())
    return job


def events(svc: Service, job_id: int, type: str) -> list[dict[str, Any]]:
    data = svc.client.get(f"/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
    return [e for e in data if e["type"] == type]


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return dict(response.json()["error"])


def test_alias_requests_are_checked(svc: Service) -> None:
    """Before any adapter: bad names and unknown adapters are refused with the field named; nothing is created."""
    assert svc.client.get("/aliases").json() == []
    for name in ("latest", "none", "job-3", "9lives"):
        error = error_of(svc.client.put(f"/aliases/{name}", json={"adapter": "job-1"}), 422)
        assert error["details"][0]["field"] == "alias", error
    assert error_of(svc.client.put("/aliases/production", json={"adapter": "job-99"}), 404)["type"] == "not_found"
    assert error_of(svc.client.put("/aliases/production", json={"adapter": "job-1", "x": 1}), 422)
    assert error_of(svc.client.get("/aliases/production"), 404)["message"] == "alias production does not exist"
    assert error_of(svc.client.delete("/aliases/production"), 404)
    bad = svc.client.post("/jobs", json={"dataset": "builtin", "promote_to": "latest"})
    assert "promote_to" in json.dumps(error_of(bad, 422))
    # FLASHTUNE_DEFAULT_ADAPTER=production: an /analyze that names no adapter means production, which is not set
    error = error_of(svc.client.post("/analyze", json={"text": TEXT}), 404)
    assert "production" in error["message"] and "GET /aliases" in error["message"], error
    base = svc.client.post("/analyze", json={"text": TEXT, "adapter": "none", "max_new_tokens": 0}).json()
    assert base["adapter"] == "none" and base["alias"] is None and len(base["probs_list"]) == 3
    assert svc.client.get("/aliases").json() == []


def test_production_moves_only_for_a_better_adapter(svc: Service) -> None:
    # 1. A job asks to be promoted; production is not set yet, so it has to beat the base, and does.
    better = succeeded(svc, name="better", hyperparameters=BETTER, promote_to="production")
    (decision,) = events(svc, better["id"], "promotion")
    data = decision["data"]
    assert data["promoted"] is True and data["alias_was"] is None and data["incumbent"] is None, decision
    assert data["items"] == len(builtin_dataset()[1]) and data["adapter"]["macro_f1"] > data["base"]["macro_f1"]
    assert decision["message"].startswith("promoted to production: macro-F1"), decision
    assert svc.client.get("/aliases/production").json()["adapter"] == better["adapter"]
    answer = agent_call(svc)  # the Agent's call follows
    assert answer["adapter"] == better["adapter"] and answer["alias"] == "production"
    assert answer["label"] in (-1, 0, 1) and len(answer["probs"]) == 3 and abs(sum(answer["probs"]) - 1) < 1e-3
    assert set(answer) == {
        *("label", "probs", "score", "importance", "market_reaction", "analysis"),
        *("adapter", "alias", "base_model", "latency_ms"),
    }
    default = svc.client.post("/analyze", json={"text": TEXT, "max_new_tokens": 0}).json()  # no adapter named
    assert default["adapter"] == better["adapter"] and default["alias"] == "production"
    assert default["probs_list"] == [default["probs"][k] for k in ("bearish", "neutral", "bullish")]
    shown = svc.client.get(f"/adapters/{better['adapter']}").json()
    assert shown["aliases"] == ["production"] and shown["promotion"]["status"] == "promoted"

    # 2. A worse job asks too: the better adapter is scored on the worse job's own held-out items beside it, wins,
    # and production stays; the event says why.
    dataset = upload(svc, builtin_dataset()[1][:40], "forty.jsonl")
    worse = succeeded(svc, name="worse", dataset=dataset, hyperparameters=WEAK, promote_to="production")
    (decision,) = events(svc, worse["id"], "promotion")
    data = decision["data"]
    assert data["promoted"] is False and decision["level"] == "warning", decision
    assert data["incumbent"]["name"] == better["adapter"] and data["items"] == 20, data
    assert data["incumbent"]["macro_f1"] >= data["adapter"]["macro_f1"], data
    assert decision["message"].startswith(f"production stays {better['adapter']}: macro-F1"), decision
    assert "does not beat" in decision["message"] and "on the same 20 held-out items" in decision["message"]
    assert svc.client.get("/aliases/production").json()["adapter"] == better["adapter"]
    assert agent_call(svc)["adapter"] == better["adapter"]
    assert svc.client.get(f"/adapters/{worse['adapter']}").json()["promotion"]["status"] == "kept"

    # 3. By hand there is no gate: a person may point production anywhere, and the Agent follows that too.
    put = svc.client.put("/aliases/production", json={"adapter": worse["adapter"], "reason": "try it"})
    assert put.status_code == 200 and put.json()["reason"] == "try it", put.text
    assert agent_call(svc)["adapter"] == worse["adapter"]
    assert [e["data"]["previous"] for e in events(svc, worse["id"], "alias")] == [better["adapter"]]
    assert svc.client.put("/aliases/production", json={"adapter": better["adapter"]}).status_code == 200
    assert agent_call(svc)["adapter"] == better["adapter"]

    # The adapter production serves cannot be deleted from under it.
    error = error_of(svc.client.delete(f"/adapters/{better['adapter']}"), 409)
    assert error["type"] == "adapter_aliased" and "production" in error["message"]


def test_a_job_without_evaluation_is_never_promoted_nor_latest(svc: Service) -> None:
    """A tiny dataset with nothing held out: the job succeeds with no evaluation; production and 'latest' stay."""
    before = svc.client.get("/aliases/production").json()["adapter"]
    latest_before = svc.client.post("/analyze", json={"text": TEXT, "adapter": "latest", "max_new_tokens": 0})
    assert latest_before.status_code == 200 and latest_before.json()["alias"] == "latest"
    dataset = upload(svc, builtin_dataset()[0][:4], "four.jsonl")
    hyperparameters = {"epochs": 1, "validation_fraction": 0}
    job = succeeded(svc, dataset=dataset, hyperparameters=hyperparameters, promote_to="production")
    (decision,) = events(svc, job["id"], "promotion")
    assert "no held-out evaluation" in decision["message"] and decision["data"]["hint"], decision
    assert svc.client.get("/aliases/production").json()["adapter"] == before
    latest = svc.client.post("/analyze", json={"text": TEXT, "adapter": "latest", "max_new_tokens": 0}).json()
    assert latest["adapter"] == latest_before.json()["adapter"] != job["adapter"]

    # By hand, from the adapter's side; then the alias goes and the adapter can be deleted again.
    promoted = svc.client.post(f"/adapters/{job['adapter']}/aliases", json={"alias": "staging"})
    assert promoted.status_code == 200 and promoted.json()["adapter"] == job["adapter"], promoted.text
    assert [a["alias"] for a in svc.client.get("/aliases").json()] == ["production", "staging"]
    assert agent_call(svc, adapter="staging")["alias"] == "staging"
    assert svc.client.delete("/aliases/staging").json() == {"deleted": "staging"}
    assert svc.client.delete(f"/adapters/{job['adapter']}").status_code == 200
