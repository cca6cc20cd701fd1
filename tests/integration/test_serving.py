"""Serving against real processes: several adapters, micro-batching, /analyze/batch, OpenAI-compatible API."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from service.llm.builtin.data import builtin_dataset
from service.llm.prompts import render_input, render_response
from tests.conftest import Service, make_service

pytestmark = pytest.mark.slow
FLIP = {"bullish": "bearish", "bearish": "bullish", "neutral": "neutral"}
# Every fourth input of the flipped set carries these, rendered as the importers render them.
FLIPPED_FIELDS = {"country": "美国", "previous": "1.2", "consensus": "1.0", "actual": "1.5"}


def _flipped_dataset() -> bytes:
    """The built-in training set with bullish and bearish swapped: an adapter that must answer differently.

    A quarter of its inputs carry a country and calendar figures, so its adapter has seen those fields."""
    lines = []
    for i, example in enumerate(builtin_dataset()[0]):
        assert example.label is not None
        star = int(example.output[4])
        output = render_response(FLIP[example.label], star)  # type: ignore[index]
        text = render_input(example.input, FLIPPED_FIELDS) if i % 4 == 0 else example.input
        lines.append(json.dumps({"instruction": example.instruction, "input": text, "output": output}))
    return "\n".join(lines).encode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[tuple[Service, str, str]]:
    svc = make_service(tmp_path_factory.mktemp("serving"), builtin_model_cache, env={"FLASHTUNE_BATCH_WAIT_MS": "20"})
    upload = svc.client.post("/datasets", files={"file": ("flipped.jsonl", io.BytesIO(_flipped_dataset()))})
    assert upload.status_code == 201, upload.text
    assert upload.json()["input_fields"] == ["previous", "consensus", "actual", "country"]
    normal = svc.post_job()
    # Unlearning the base's mapping takes a plateau first: after 4 epochs (loss ~0.034) held-out accuracy was 0.625
    # on one install and high on another; after 8 (loss ~0.012) it is 1.0.
    flipped = svc.post_job(dataset=upload.json()["id"], hyperparameters={"validation_fraction": 0.1, "epochs": 8})
    for job in (normal, flipped):
        assert svc.wait(job["id"])["status"] == "succeeded", svc.logs()
    yield svc, f"job-{normal['id']}", f"job-{flipped['id']}"
    svc.stop()


def _analyze(svc: Service, body: dict[str, Any]) -> dict[str, Any]:
    response = svc.client.post("/analyze", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _same(a: dict[str, float], b: dict[str, float], tolerance: float = 1e-6) -> bool:
    return all(abs(a[k] - b[k]) <= tolerance for k in a)


def test_two_adapters_answer_differently_in_one_batch(served: tuple[Service, str, str]) -> None:
    """Requests for two adapters share one forward pass (peft's mixed batch) and answer as one at a time."""
    svc, normal, flipped = served
    texts = [e.input for e in builtin_dataset()[1] if e.label != "neutral"][:8]
    bodies = [{"text": t, "adapter": name, "max_new_tokens": 0} for t in texts for name in (normal, flipped)]
    with ThreadPoolExecutor(17) as pool:
        # a slow request (a long text, a long generation) holds the micro-batcher while the others queue up behind
        # it, so they are gathered into one micro-batch: both adapters together
        slow = pool.submit(_analyze, svc, {"text": "美联储宣布加息。" * 400, "adapter": "none", "max_new_tokens": 256})
        time.sleep(0.1)
        results = list(pool.map(lambda b: _analyze(svc, b), bodies))
        slow.result()
    labels = {(b["text"], b["adapter"]): r["label"] for b, r in zip(bodies, results, strict=True)}
    opposite = sum(labels[(t, flipped)] == FLIP[labels[(t, normal)]] for t in texts)
    assert opposite >= 6, labels  # the flipped adapter is ~0.95 accurate on its own held-out split
    # one forward pass served more requests than either adapter had: requests of both adapters
    assert max(r["batch_size"] for r in results) > len(texts), [r["batch_size"] for r in results]
    for body, result in zip(bodies, results, strict=True):  # the same answers as one request at a time
        single = _analyze(svc, body)
        assert single["batch_size"] == 1 and single["adapter"] == result["adapter"] == body["adapter"]
        assert single["label"] == result["label"] and single["importance"] == result["importance"]
        assert _same(single["probs"], result["probs"], 1e-4), (single["probs"], result["probs"])


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
    latest = _analyze(svc, {"text": "美联储宣布加息25个基点", "max_new_tokens": 0})  # no adapter named: latest
    assert latest["adapter"] == flipped and latest["alias"] == "latest"
    base = _analyze(svc, {"text": "美联储宣布加息25个基点", "adapter": "none", "max_new_tokens": 0})
    assert base["adapter"] == "none" and base["alias"] is None and base["base_model"] == "builtin"


def test_metadata_and_market_context(served: tuple[Service, str, str]) -> None:
    """Fields reach the model only where the adapter's training inputs had them, rendered as in training."""
    svc, normal, flipped = served
    text = "美国财政部宣布人事调整"
    metadata = {"country": "美国", "previous": 1.2, "consensus": "1.0", "actual": "1.5", "star": 4}
    context = {"pre_ret": -0.0021, "volatility": 0.0015, "trend": "down"}
    body = {"text": text, "metadata": metadata, "market_context": context, "adapter": flipped, "max_new_tokens": 0}
    with_fields = _analyze(svc, body)
    seen = ["previous", "consensus", "actual", "country"]
    assert with_fields["context_used"] == seen
    assert with_fields["context_ignored"] == ["star", "pre_ret", "volatility", "trend"]
    assert svc.client.get(f"/adapters/{flipped}").json()["input_fields"] == seen
    # the same input written out by the training-side renderer answers exactly the same
    rendered = render_input(text, {k: v for k, v in metadata.items() if k in seen})
    as_text = _analyze(svc, {"text": rendered, "adapter": flipped, "max_new_tokens": 0})
    assert as_text["context_used"] == [] and _same(as_text["probs"], with_fields["probs"])
    plain = _analyze(svc, {"text": text, "adapter": flipped, "max_new_tokens": 0})
    assert not _same(plain["probs"], with_fields["probs"])  # the fields did change the input

    # an adapter that never saw any field ignores them all and answers as for the bare text
    ignored = _analyze(svc, {**body, "adapter": normal})
    assert ignored["context_used"] == [] and len(ignored["context_ignored"]) == 8
    assert _same(ignored["probs"], _analyze(svc, {"text": text, "adapter": normal, "max_new_tokens": 0})["probs"])
    # the base alone takes every field
    assert len(_analyze(svc, {**body, "adapter": "none"})["context_used"]) == 8

    # batch items: plain strings and objects, mixed
    batch = svc.client.post(
        "/analyze/batch",
        json={"items": [text, {"text": text, "metadata": metadata}], "adapter": flipped, "max_new_tokens": 0},
    )
    assert batch.status_code == 200, batch.text
    first, second = batch.json()["data"]
    assert first["context_used"] == [] and second["context_used"] == seen
    assert abs(second["probs"]["bullish"] - with_fields["probs"]["bullish"]) < 1e-3


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/analyze", {"text": "   "}, 422, "text"),
        ("/analyze", {"text": "x" * 5000}, 422, "text"),
        ("/analyze", {"text": "ok", "adapter": "job-999"}, 404, None),
        ("/analyze", {"text": "ok", "adapter": "../../etc/passwd"}, 404, None),
        ("/analyze", {"text": "ok", "max_new_tokens": 100000}, 422, "max_new_tokens"),
        ("/analyze", {"text": "ok", "unknown": 1}, 422, "unknown"),
        ("/analyze", {"text": 5}, 422, "text"),
        ("/analyze", {"text": "ok", "market_context": {"pre_ret": 3}}, 422, "market_context.pre_ret"),
        ("/analyze", {"text": "ok", "market_context": {"pre_ret": "0.1"}}, 422, "market_context.pre_ret"),
        ("/analyze", {"text": "ok", "market_context": {"volatility": -0.1}}, 422, "market_context.volatility"),
        ("/analyze", {"text": "ok", "market_context": {"trend": "sideways"}}, 422, "market_context.trend"),
        ("/analyze", {"text": "ok", "market_context": {"beta": 1}}, 422, "market_context.beta"),
        ("/analyze", {"text": "ok", "metadata": {"star": 6}}, 422, "metadata.star"),
        ("/analyze", {"text": "ok", "metadata": {"star": True}}, 422, "metadata.star"),
        ("/analyze", {"text": "ok", "metadata": {"country": "a\nb"}}, 422, "metadata.country"),
        ("/analyze", {"text": "ok", "metadata": {"actual": "9" * 65}}, 422, "metadata.actual"),
        ("/analyze", {"text": "ok", "metadata": {"previous": [1]}}, 422, "metadata.previous"),
        ("/analyze", {"text": "ok", "metadata": "star 5"}, 422, "metadata"),
        ("/analyze/batch", {"items": []}, 422, "items"),
        ("/analyze/batch", {"items": ["ok", " "]}, 422, "items.1"),
        ("/analyze/batch", {"items": ["ok", "x" * 5000]}, 422, "items.1"),
        ("/analyze/batch", {"items": [{"text": "ok"}, {"text": ""}]}, 422, "items.1"),
        ("/analyze/batch", {"items": [{"text": "ok", "metadata": {"star": 0}}]}, 422, "items.0"),
        ("/analyze/batch", {"items": [{"txt": "ok"}]}, 422, "items.0"),
        ("/analyze/batch", {"items": ["ok"], "adapter": "job-999"}, 404, None),
    ],
)
def test_bad_analyze_requests(
    served: tuple[Service, str, str], path: str, body: dict[str, Any], status: int, field: str | None
) -> None:
    svc, _, _ = served
    response = svc.client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if field:
        assert field in json.dumps(error.get("details"))


def test_batch_over_limit_and_failed_or_cancelled_job_adapter(served: tuple[Service, str, str]) -> None:
    svc, _, _ = served
    response = svc.client.post("/analyze/batch", json={"items": ["a"] * 65})
    assert response.status_code == 422 and "items" in response.text
    bad = svc.post_job(hyperparameters={"target_modules": ["nope"], "epochs": 1})
    assert svc.wait(bad["id"])["status"] == "failed"
    cancelled = svc.post_job(hyperparameters={"epochs": 1})
    assert svc.client.post(f"/jobs/{cancelled['id']}/cancel").status_code == 200
    assert svc.wait(cancelled["id"])["status"] == "cancelled"
    for job, status in ((bad, "failed"), (cancelled, "cancelled")):
        for path, body in (("/analyze", {"text": "ok"}), ("/analyze/batch", {"items": ["ok"]})):
            response = svc.client.post(path, json={**body, "adapter": f"job-{job['id']}"})
            assert response.status_code == 409 and status in response.json()["error"]["message"], response.text


def test_merged_adapter_answers_as_attached(served: tuple[Service, str, str]) -> None:
    """A second API on the same data, serving the adapter merged into a float32 copy of the base."""
    svc, _, flipped = served
    merged = Service(svc.data_dir, env={"FLASHTUNE_SERVE_MERGED": flipped})
    merged.start_api()
    try:
        texts = [e.input for e in builtin_dataset()[1][:6]]
        body = {"items": texts, "adapter": flipped, "max_new_tokens": 12}
        attached = svc.client.post("/analyze/batch", json=body).json()["data"]
        response = merged.client.post("/analyze/batch", json=body)
        assert response.status_code == 200, merged.logs()
        for a, m in zip(attached, response.json()["data"], strict=True):
            assert m["merged"] and not a["merged"]
            assert a["label"] == m["label"] and a["importance"] == m["importance"]
            assert all(abs(a["probs"][k] - m["probs"][k]) < 1e-4 for k in a["probs"]), (a["probs"], m["probs"])
        base = merged.client.post("/analyze", json={"text": texts[0], "adapter": "none", "max_new_tokens": 0})
        assert base.status_code == 200 and not base.json()["merged"]  # the base alone still works beside it
    finally:
        if merged.api is not None:
            merged.api.terminate()
            merged.api.wait(30)
        merged.client.close()


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
    cut = client.chat.completions.create(
        model=normal, messages=[{"role": "user", "content": "美联储宣布加息25个基点"}], max_tokens=3
    )
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None and cut.usage.completion_tokens == 3

    started = time.perf_counter()
    client.chat.completions.create(
        model=normal, messages=[{"role": "user", "content": "美联储宣布加息25个基点"}], max_tokens=60
    )
    whole_request = time.perf_counter() - started
    stream = client.chat.completions.create(
        model=normal,
        messages=[{"role": "user", "content": "美联储宣布加息25个基点"}],
        max_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [(time.perf_counter(), c) for c in stream]
    assert chunks[-1][1].usage == completion.usage and not chunks[-1][1].choices  # the counts come last
    assert chunks[-2][1].choices[0].finish_reason == completion.choices[0].finish_reason
    pieces = [(t, c.choices[0].delta.content or "") for t, c in chunks if c.choices]
    pieces = [(t, p) for t, p in pieces if p]
    assert "".join(p for _, p in pieces) == completion.choices[0].message.content
    assert len(pieces) > 10  # about one chunk per character (a CJK character is up to 3 byte tokens)
    # token by token: the chunks arrive while the answer is being generated, not all at once at the end
    assert pieces[-1][0] - pieces[0][0] > 0.25 * whole_request, (pieces[-1][0] - pieces[0][0], whole_request)

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
