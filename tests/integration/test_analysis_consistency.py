"""The analysis text never contradicts the label, and the probabilities say whether they are calibrated: real
``flashtune serve`` and ``flashtune worker`` processes, a built-in job, the built-in model and its adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.llm.builtin.data import builtin_dataset, generate
from service.llm.prompts import Stated, parse_response
from tests.conftest import Service, make_service

pytestmark = pytest.mark.slow
ITEMS = 100
CHUNK = 50  # under FLASHTUNE_MAX_BATCH_ITEMS


def _items() -> list[str]:
    """100 news texts no job trained on: built-in templates with other draws, and a few texts of other kinds."""
    train, held_out = builtin_dataset()
    seen = {e.input for e in train + held_out}
    others = ["Oil output steady 🛢️", "某公司季度亏损扩大，股价盘前下跌", "市场等待非农数据", "ECB keeps rates", "。"]
    fresh = [e.input for e in generate(400, seed=99) if e.input not in seen]
    return (others + list(dict.fromkeys(fresh)))[:ITEMS]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[tuple[Service, str]]:
    """A service with one built-in job of one epoch: an adapter weaker than the default recipe's."""
    svc = make_service(tmp_path_factory.mktemp("consistency"), builtin_model_cache)
    job = svc.post_job(hyperparameters={"epochs": 1})
    assert svc.wait(job["id"])["status"] == "succeeded", svc.logs()
    yield svc, f"job-{job['id']}"
    svc.stop()


def _batch(svc: Service, adapter: str, texts: list[str], **extra: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(texts), CHUNK):
        body = {"items": texts[start : start + CHUNK], "adapter": adapter, **extra}
        response = svc.client.post("/analyze/batch", json=body, timeout=600)
        assert response.status_code == 200, response.text
        out += response.json()["data"]
    return out


@pytest.mark.parametrize("adapter", ["none", "trained"])
def test_every_analysis_parses_back_to_its_label(served: tuple[Service, str], adapter: str) -> None:
    """100 items, the base model alone and an adapter: each text states the scored label, importance and reaction."""
    svc, name = served
    texts = _items()
    assert len(texts) == ITEMS
    results = _batch(svc, name if adapter == "trained" else "none", texts)
    for text, result in zip(texts, results, strict=True):
        stated = parse_response(result["analysis"])
        assert stated == Stated(result["label"], result["importance"], result["market_reaction"]), (text, result)
        assert result["generation"] == "prefix" and result["consistent"] is True, result
    assert {r["label"] for r in results} >= ({"bullish", "bearish"} if adapter == "trained" else set())


def test_free_generation_says_so_and_reports_disagreement(served: tuple[Service, str]) -> None:
    """The base model's free text often names another label than the one scored (the issue's neutral 43% with a
    bullish text): the response says the text was generated freely and whether it agrees."""
    svc, _ = served
    results = _batch(svc, "none", _items()[:20], generation="free", max_new_tokens=48)
    for result in results:
        stated = parse_response(result["analysis"])
        agrees = (
            stated.label == result["label"]
            and stated.star in (None, result["importance"])
            and stated.reaction in (None, result["market_reaction"])
        )
        assert result["generation"] == "free" and result["consistent"] is agrees, result
    assert any(r["consistent"] is False for r in results), [r["analysis"] for r in results]
    silent = svc.client.post("/analyze", json={"text": "美联储宣布加息25个基点", "max_new_tokens": 0}).json()
    assert silent["analysis"] == "" and silent["consistent"] is None  # no text: nothing to agree or disagree
    bad = svc.client.post("/analyze", json={"text": "美联储宣布加息25个基点", "generation": "creative"})
    assert bad.status_code == 422 and "generation" in bad.text, bad.text


def test_calibration_is_fitted_stored_and_applied(served: tuple[Service, str]) -> None:
    """The job fits a temperature on its validation split, reports the probability metrics before and after, and
    /analyze applies it exactly when the job kept it; the base model alone is not calibrated."""
    svc, name = served
    metrics = svc.client.get(f"/adapters/{name}").json()["metrics"]
    calibration = metrics["calibration"]
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    assert calibration["applied"] == (calibration["nll_after"] < calibration["nll_before"])
    for who in ("base", "adapter"):
        figures = metrics[who]
        assert {"accuracy", "macro_f1", "nll", "brier", "ece", "reliability", "calibrated"} <= set(figures)
        assert len(figures["reliability"]) == 10
        assert figures["calibrated"]["accuracy"] == figures["accuracy"]  # calibration changes no label
    text = builtin_dataset()[1][0].input
    served_adapter = svc.client.post("/analyze", json={"text": text, "adapter": name, "max_new_tokens": 0}).json()
    assert served_adapter["calibrated"] is calibration["applied"]
    assert served_adapter["temperature"] == (calibration["temperature"] if calibration["applied"] else None)
    base = svc.client.post("/analyze", json={"text": text, "adapter": "none", "max_new_tokens": 0}).json()
    assert base["calibrated"] is False and base["temperature"] is None
