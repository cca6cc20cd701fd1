"""Temperature scaling and the calibration measures (service/llm/calibration.py), the probability metrics of a job's
evaluation, the temperature read back from training_info.json, and the response prefix the analysis continues:
pure functions, no model."""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

import pytest

from service.core.training_info import calibration_temperature
from service.llm import calibration as cal
from service.llm.builtin.data import builtin_dataset
from service.llm.prompts import (
    LABELS,
    REACTION_WORDS,
    Stated,
    parse_response,
    render_response,
    render_response_prefix,
)
from service.llm.scoring import Prediction


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def _over_confident(count: int, seed: int, sharpen: float = 3.0) -> tuple[list[list[float]], list[int]]:
    """Items whose gold label is drawn from true probabilities, scored by a model ``sharpen`` times surer than it
    should be (its log-probabilities multiplied): a deliberately over-confident scorer."""
    rng = random.Random(seed)
    scores, gold = [], []
    for _ in range(count):
        true = cal.apply([rng.gauss(0, 1.2) for _ in range(3)])
        gold.append(rng.choices(range(3), weights=true)[0])
        scores.append([sharpen * math.log(p) for p in true])
    return scores, gold


def test_measures_of_known_sets() -> None:
    probs, gold = [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]], [0, 1]
    assert cal.nll(probs, gold) == pytest.approx((-math.log(0.8) - math.log(0.3)) / 2)
    assert cal.brier(probs, gold) == pytest.approx(((0.04 + 0.01 + 0.01) + (0.36 + 0.49 + 0.01)) / 2)
    # bins of the top probability: 0.8 in [0.8, 0.9) (right), 0.6 in [0.6, 0.7) (wrong)
    bins = cal.reliability(probs, gold)
    assert len(bins) == cal.ECE_BINS and [b.count for b in bins] == [0] * 6 + [1, 0, 1, 0]
    assert (bins[8].confidence, bins[8].accuracy, bins[6].accuracy) == (0.8, 1.0, 0.0)
    assert cal.ece(probs, gold) == pytest.approx((0.2 + 0.6) / 2)
    assert cal.reliability([[0.0, 0.0, 1.0]], [2])[-1].count == 1  # a certain answer falls in the last bin
    assert cal.ece([[1 / 3] * 3] * 3, [0, 1, 2]) == pytest.approx(0.0, abs=1e-12)  # 1/3 sure, right 1 in 3
    with pytest.raises(ValueError):
        cal.nll([], [])


def test_apply_is_a_tempered_softmax() -> None:
    scores = [-0.1, -2.5, -4.0]
    assert cal.apply(scores) == pytest.approx([math.exp(s) / sum(map(math.exp, scores)) for s in scores])
    assert sum(cal.apply(scores, 2.0)) == pytest.approx(1.0)
    assert cal.apply(scores, 1e6) == pytest.approx([1 / 3] * 3, abs=1e-5)  # very hot: uniform
    assert cal.apply([-1e4, -1e4 - 50, -2e4], 0.5)[0] == pytest.approx(1.0)  # no overflow on large scores
    with pytest.raises(ValueError):
        cal.apply(scores, 0.0)


def test_calibration_never_changes_a_label_and_lowers_held_out_nll_of_an_over_confident_scorer() -> None:
    scores, gold = _over_confident(400, seed=7)
    fit_scores, fit_gold = scores[:200], gold[:200]
    held_scores, held_gold = scores[200:], gold[200:]
    fitted = cal.calibrate(fit_scores, fit_gold)
    assert fitted is not None and fitted.applied and fitted.nll_after < fitted.nll_before
    assert 2.0 < fitted.temperature < 4.5  # the scorer is 3x too sure: T near 3 undoes it
    raw = [cal.apply(row) for row in held_scores]
    calibrated = [cal.apply(row, fitted.temperature) for row in held_scores]
    assert [_argmax(r) for r in calibrated] == [_argmax(r) for r in raw]  # not one predicted label changes
    assert cal.nll(calibrated, held_gold) < 0.8 * cal.nll(raw, held_gold)
    assert cal.ece(calibrated, held_gold) < cal.ece(raw, held_gold)
    assert cal.brier(calibrated, held_gold) < cal.brier(raw, held_gold)


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 5.0, 20.0])
def test_no_temperature_changes_a_label(temperature: float) -> None:
    rng = random.Random(3)
    for _ in range(200):
        scores = [rng.uniform(-30, 0) for _ in range(3)]
        assert _argmax(cal.apply(scores, temperature)) == _argmax(cal.apply(scores))


def test_a_calibrated_scorer_keeps_t_near_one() -> None:
    scores, gold = _over_confident(600, seed=11, sharpen=1.0)
    assert 0.8 < cal.fit_temperature(scores, gold) < 1.25


def test_a_split_without_mistakes_does_not_make_the_scorer_certain() -> None:
    """All right: the NLL alone falls without end as T goes to 0; the prior on log T keeps T moderate, so the first
    mistake later is not scored as impossible."""
    scores = [[-0.2, -2.0, -3.0], [-3.0, -0.3, -1.8], [-2.2, -2.5, -0.25]] * 10
    gold = [0, 1, 2] * 10
    temperature = cal.fit_temperature(scores, gold)
    assert 0.1 < temperature < 1.0


def test_cross_fitted_probabilities_come_from_the_other_folds() -> None:
    scores, gold = _over_confident(50, seed=5)
    crossed = cal.cross_fitted(scores, gold, folds=5)
    fold0 = [i for i in range(50) if i % 5 != 0]
    temperature = cal.fit_temperature([scores[i] for i in fold0], [gold[i] for i in fold0])
    assert crossed[0] == pytest.approx(cal.apply(scores[0], temperature))
    assert crossed[5] == pytest.approx(cal.apply(scores[5], temperature))


def test_too_few_items_fit_nothing_and_a_useless_temperature_is_not_applied() -> None:
    assert cal.calibrate([[-0.1, -3.0, -3.0]] * 5, [0] * 5) is None
    scores, gold = _over_confident(300, seed=2, sharpen=1.0)  # already calibrated: T near 1 cannot help much
    fitted = cal.calibrate(scores, gold)
    assert fitted is not None and fitted.as_dict()["method"] == "temperature"
    assert fitted.applied == (fitted.nll_after < fitted.nll_before)
    assert abs(fitted.nll_after - fitted.nll_before) < 0.02


def test_the_builtin_validation_split_is_large_enough_to_fit_a_temperature() -> None:
    """Issue 24: 60 validation items holding one or two mistakes fitted the temperature loosely; the built-in split
    holds 262 now, every label about equally, no training text among them, and the training split is the one it
    always was (so the adapter trained with the defaults is too)."""
    train, validation = builtin_dataset()
    assert (len(train), len(validation)) == (240, 262)
    texts = [e.input for e in train + validation]
    assert len(set(texts)) == len(texts)
    assert min(sum(e.label == label for e in validation) for label in LABELS) >= 80
    digest = hashlib.sha256("\n".join(f"{e.input}\t{e.output}" for e in train).encode()).hexdigest()
    assert digest == "96ba8d876cc4f6255788a76addc98b82ab2d9fcc7ffec631a4a31905d772319b"


# --------------------------------------------------------------------------- where calibration and the text meet
def _prediction(scores: list[float], star: int = 4, reaction: str = "上涨") -> Prediction:
    probs = dict(zip(LABELS, cal.apply(scores), strict=True))
    label = max(probs, key=probs.__getitem__)
    return Prediction(label, probs, star, reaction, label_logprobs=tuple(scores))


def test_a_calibrated_prediction_keeps_its_label_and_says_so() -> None:
    raw = _prediction([-3.0, -1.5, -0.4])
    hot = raw.calibrated(2.5)
    assert hot.label == raw.label == "bullish" and hot.temperature == 2.5
    assert hot.probs["bullish"] < raw.probs["bullish"] and sum(hot.probs.values()) == pytest.approx(1.0)
    assert list(hot.probs.values()) == pytest.approx(cal.apply([-3.0, -1.5, -0.4], 2.5))
    assert raw.calibrated(None) is raw and raw.temperature is None


def test_the_response_prefix_states_what_was_scored_and_parses_back() -> None:
    for label in LABELS:
        for star in (1, 5):
            for reaction in REACTION_WORDS.values():
                prediction = Prediction(label, dict.fromkeys(LABELS, 1 / 3), star, reaction)
                text = prediction.response_prefix() + "建议投资者谨慎。"
                assert parse_response(text) == Stated(label, star, reaction)
                assert prediction.agrees_with(text)
    prediction = Prediction("neutral", dict.fromkeys(LABELS, 1 / 3), 4, "震荡")
    # the case: label neutral scored, a free text that calls the news bullish
    assert not prediction.agrees_with(
        "这是一条4星级的财经快讯，属于利好消息。从市场反应来看，该消息发布后市场出现上涨走势。"
    )
    assert not prediction.agrees_with("这是一条3星级的财经快讯，属于中性消息。")  # another importance
    assert not prediction.agrees_with("市场情绪平稳")  # states no label
    assert prediction.agrees_with("中性（Neutral）")  # the user's second style, nothing else stated
    assert render_response("bearish", 5).startswith(render_response_prefix("bearish", 5, REACTION_WORDS["bearish"]))
    with pytest.raises(ValueError):
        render_response_prefix("bearish", 5, "暴涨")


def test_probability_metrics_report_before_and_after_and_the_served_temperature() -> None:
    from workers.training.evaluation import probability_metrics

    scores, gold_index = _over_confident(60, seed=9)
    gold = [LABELS[g] for g in gold_index]
    predictions = [_prediction(list(row)) for row in scores]
    metrics = probability_metrics(gold, predictions)
    assert {"nll", "brier", "ece", "reliability"} <= set(metrics) and len(metrics["reliability"]) == cal.ECE_BINS
    after = metrics["calibrated"]
    assert after["applied"] and after["temperature"] > 1.5 and after["folds"] == cal.FOLDS
    assert after["nll"] < metrics["nll"] and after["ece"] < metrics["ece"]
    raw_accuracy = sum(p.label == g for p, g in zip(predictions, gold, strict=True)) / len(gold)
    assert after["accuracy"] == round(raw_accuracy, 4)  # the same labels
    assert "calibrated" not in probability_metrics(gold[:5], predictions[:5])  # too few items to fit


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"metrics": {"calibration": {"temperature": 1.7, "applied": True}}}, 1.7),
        ({"metrics": {"calibration": {"temperature": 1.7, "applied": False}}}, None),
        ({"metrics": {"calibration": {"temperature": 0, "applied": True}}}, None),
        ({"metrics": {"calibration": {"temperature": "2", "applied": True}}}, None),
        ({"metrics": {"calibration": {"temperature": True, "applied": True}}}, None),
        ({"metrics": {"accuracy": 1.0}}, None),
        ({"metrics": []}, None),
        ({}, None),
    ],
)
def test_the_served_temperature_is_read_from_training_info(record: dict[str, Any], expected: float | None) -> None:
    assert calibration_temperature(record) == expected
