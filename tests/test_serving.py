"""Serving against real processes: several adapters, micro-batching, /analyze/batch, OpenAI-compatible API."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from service.builtin.data import builtin_dataset
from service.prompts import render_response
from tests.conftest import Service, make_service

pytestmark = pytest.mark.slow
FLIP = {"bullish": "bearish", "bearish": "bullish", "neutral": "neutral"}


def _flipped_dataset() -> bytes:
    """The built-in training set with bullish and bearish swapped: an adapter that must answer differently."""
    lines = []
    for example in builtin_dataset()[0]:
        assert example.label is not None
        star = int(example.output[4])
        output = render_response(FLIP[example.label], star)  # type: ignore[index]
        lines.append(json.dumps({"instruction": example.instruction, "input": example.input, "output": output}))
    return "\n".join(lines).encode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[tuple[Service, str, str]]:
    svc = make_service(tmp_path_factory.mktemp("serving"), builtin_model_cache, env={"FLASHTUNE_BATCH_WAIT_MS": "20"})
    upload = svc.client.post("/datasets", files={"file": ("flipped.jsonl", io.BytesIO(_flipped_dataset()))})
    assert upload.status_code == 201, upload.text
    normal = svc.post_job()
    flipped = svc.post_job(dataset=upload.json()["id"], hyperparameters={"validation_fraction": 0.1})
    for job in (normal, flipped):
        assert svc.wait(job["id"])["status"] == "succeeded", svc.logs()
    yield svc, f"job-{normal['id']}", f"job-{flipped['id']}"
    svc.stop()


def _analyze(svc: Service, body: dict[str, Any]) -> dict[str, Any]:
    response = svc.client.post("/analyze", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_two_adapters_answer_differently_in_one_batch(served: tuple[Service, str, str]) -> None:
    svc, normal, flipped = served
    texts = [e.input for e in builtin_dataset()[1] if e.label != "neutral"][:8]
    bodies = [{"text": t, "adapter": name, "max_new_tokens": 0} for t in texts for name in (normal, flipped)]
    with ThreadPoolExecutor(16) as pool:  # all at once: the micro-batcher groups them by adapter
        results = list(pool.map(lambda b: _analyze(svc, b), bodies))
    labels = {(b["text"], b["adapter"]): r["label"] for b, r in zip(bodies, results, strict=True)}
    opposite = sum(labels[(t, flipped)] == FLIP[labels[(t, normal)]] for t in texts)
    assert opposite >= 6, labels  # the flipped adapter is ~0.95 accurate on its own held-out split
    assert max(r["batch_size"] for r in results) > 1  # concurrent requests shared forward passes


def test_batch_endpoint_and_fast_path(served: tuple[Service, str, str]) -> None:
    svc, normal, _ = served
    texts = [e.input for e in builtin_dataset()[1][:3]]
    batch = svc.client.post("/analyze/batch", json={"items": texts, "adapter": normal, "max_new_tokens": 0})
    assert batch.status_code == 200, batch.text
    data = batch.json()["data"]
    assert all(d["analysis"] == "" and d["batch_size"] == 3 and d["adapter"] == normal for d in data)
    for text, item in zip(texts, data, strict=True):  # one padded batch answers as one request at a time
        single = _analyze(svc, {"text": text, "adapter": normal, "max_new_tokens": 0})
        assert single["label"] == item["label"] and single["importance"] == item["importance"]
        assert all(abs(single["probs"][k] - item["probs"][k]) < 1e-3 for k in item["probs"])


def test_base_model_and_newest_adapter(served: tuple[Service, str, str]) -> None:
    svc, _, flipped = served
    assert _analyze(svc, {"text": "美联储宣布加息25个基点", "max_new_tokens": 0})["adapter"] == flipped  # latest
    base = _analyze(svc, {"text": "美联储宣布加息25个基点", "adapter": "none", "max_new_tokens": 0})
    assert base["adapter"] is None and base["base_model"] == "builtin"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"text": "   "}, 422, "text"),
        ({"text": "x" * 5000}, 422, "text"),
        ({"text": "ok", "adapter": "job-999"}, 404, None),
        ({"text": "ok", "adapter": "../../etc/passwd"}, 404, None),
        ({"text": "ok", "max_new_tokens": 100000}, 422, "max_new_tokens"),
        ({"text": "ok", "unknown": 1}, 422, "unknown"),
        ({"text": 5}, 422, "text"),
    ],
)
def test_bad_analyze_requests(
    served: tuple[Service, str, str], body: dict[str, Any], status: int, field: str | None
) -> None:
    svc, _, _ = served
    response = svc.client.post("/analyze", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if field:
        assert field in json.dumps(error.get("details"))


def test_batch_over_limit_and_failed_job_adapter(served: tuple[Service, str, str]) -> None:
    svc, _, _ = served
    response = svc.client.post("/analyze/batch", json={"items": ["a"] * 65})
    assert response.status_code == 422 and "items" in response.text
    bad = svc.post_job(hyperparameters={"target_modules": ["nope"], "epochs": 1})
    assert svc.wait(bad["id"])["status"] == "failed"
    response = svc.client.post("/analyze", json={"text": "ok", "adapter": f"job-{bad['id']}"})
    assert response.status_code == 409 and "failed" in response.json()["error"]["message"]


def test_openai_client(served: tuple[Service, str, str]) -> None:
    from openai import OpenAI

    svc, normal, flipped = served
    client = OpenAI(base_url=f"{svc.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "builtin" and {normal, flipped} <= set(ids)

    completion = client.chat.completions.create(
        model=normal, messages=[{"role": "user", "content": "美联储宣布加息25个基点"}], max_tokens=60
    )
    assert "利空" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=normal, messages=[{"role": "user", "content": "美联储宣布加息25个基点"}], max_tokens=60, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == completion.choices[0].message.content

    choice = client.chat.completions.create(
        model=normal,
        messages=[{"role": "user", "content": "美联储宣布加息25个基点"}],
        extra_body={"guided_choice": ["这是一条5星级的财经快讯，属于利好", "这是一条5星级的财经快讯，属于利空"]},
    )
    assert choice.choices[0].message.content == "这是一条5星级的财经快讯，属于利空"

    as_json = client.chat.completions.create(
        model=normal,
        messages=[{"role": "user", "content": "欧洲央行宣布降息50个基点"}],
        response_format={"type": "json_object"},
    )
    parsed = json.loads(as_json.choices[0].message.content or "{}")
    assert parsed["label"] == "bullish" and set(parsed["probs"]) == {"bearish", "neutral", "bullish"}


def test_deleted_adapter_disappears(served: tuple[Service, str, str]) -> None:
    svc, normal, _ = served
    assert (
        _analyze(svc, {"text": "美联储宣布加息25个基点", "adapter": normal, "max_new_tokens": 0})["label"] == "bearish"
    )
    assert svc.client.delete(f"/adapters/{normal}").json() == {"deleted": normal}
    assert svc.client.post("/analyze", json={"text": "ok", "adapter": normal}).status_code == 404
    assert svc.client.get(f"/adapters/{normal}").status_code == 404
    assert normal not in [m["id"] for m in svc.client.get("/v1/models").json()["data"]]
    assert not (svc.data_dir / "adapters" / normal).exists()
    job = svc.job(int(normal.removeprefix("job-")))
    assert job["status"] == "succeeded" and job["adapter"] is None
