"""Temperature scaling and the calibration measures (service/llm/calibration.py): pure functions, no model."""

from __future__ import annotations

import math
import random

import pytest

from service.llm import calibration as cal


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
