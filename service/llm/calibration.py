"""Calibration of the label probabilities: temperature scaling, and the measures that say how well calibrated they are.

/analyze's probabilities are the softmax of the three label log-likelihoods (``service.llm.scoring``). A fine-tuned
adapter is often more (or less) sure than it is right; temperature scaling divides the log-likelihoods by one number
``T`` fitted to minimise the negative log-likelihood (NLL) of the gold labels on the job's validation split
(Guo et al., 2017), with a weak prior on ``log T`` (:func:`fit_temperature`). ``T > 1`` softens over-confident
probabilities, ``T < 1`` sharpens timid ones; a positive ``T`` never changes which label is the most probable, so
calibration never changes a predicted label.

The validation split both fits ``T`` and judges it, so the judgement is cross-fitted (:func:`cross_fitted`): each item
is scored with a ``T`` fitted on the other folds, and the fitted ``T`` is kept only if that lowers the NLL
(:func:`calibrate`). The measures:

- NLL: mean of ``-log p(gold)``;
- Brier score: mean over items of the squared distance between the probabilities and the one-hot gold label;
- ECE (expected calibration error) of the top label: the items binned by their top probability into 10 equal-width
  bins, the gap between mean confidence and accuracy of each bin, weighted by the bin's share of the items
  (:func:`reliability` gives the bins, the dashboard's reliability diagram draws them).

No torch (numpy for the fit): the worker fits, the serving engine applies (:func:`apply`), the tests check it
directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ECE_BINS = 10
TEMPERATURE_RANGE = (0.05, 20.0)  # the search range of T; the ends are far outside what a sane model needs
PRIOR_SD = 1.0  # of log T: T between 1/7.4 and 7.4 at two standard deviations
_GRID = 121  # points of the coarse search over log T
FOLDS = 5
MIN_ITEMS = 10  # fewer labelled validation items than this: no calibration is fitted
_TOLERANCE = 1e-4  # on log T: far below what changes a probability in its sixth decimal
_FLOOR = 1e-12  # probabilities are floored here before the log (a label scored at exactly 0)

Scores = Sequence[float]  # one item's label log-likelihoods (or any scores softmax turns into probabilities)


def apply(scores: Scores, temperature: float = 1.0) -> list[float]:
    """The probabilities of ``scores`` divided by ``temperature`` (softmax; ``1.0``: uncalibrated)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    scaled = [s / temperature for s in scores]
    top = max(scaled)
    exps = [math.exp(s - top) for s in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def nll(probs: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Mean negative log-likelihood of the gold labels (``gold``: index into each row)."""
    _check(probs, gold)
    return sum(-math.log(max(row[g], _FLOOR)) for row, g in zip(probs, gold, strict=True)) / len(gold)


def brier(probs: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Mean squared distance between each row of probabilities and its one-hot gold label (0 best, 2 worst)."""
    _check(probs, gold)
    total = sum(sum((p - (k == g)) ** 2 for k, p in enumerate(row)) for row, g in zip(probs, gold, strict=True))
    return total / len(gold)


@dataclass(frozen=True)
class Bin:
    """One bin of a reliability diagram: items whose top probability is in ``[lower, upper)`` (the last bin closed)."""

    lower: float
    upper: float
    count: int
    confidence: float  # mean top probability (0 for an empty bin)
    accuracy: float  # share whose top label is the gold one (0 for an empty bin)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lower": round(self.lower, 4),
            "upper": round(self.upper, 4),
            "count": self.count,
            "confidence": round(self.confidence, 4),
            "accuracy": round(self.accuracy, 4),
        }


def reliability(probs: Sequence[Sequence[float]], gold: Sequence[int], bins: int = ECE_BINS) -> list[Bin]:
    """The reliability diagram of the top label: ``bins`` equal-width bins of confidence over [0, 1]."""
    _check(probs, gold)
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for row, g in zip(probs, gold, strict=True):
        top = max(range(len(row)), key=row.__getitem__)
        members[min(int(row[top] * bins), bins - 1)].append((row[top], top == g))
    return [
        Bin(
            lower=i / bins,
            upper=(i + 1) / bins,
            count=len(items),
            confidence=sum(c for c, _ in items) / len(items) if items else 0.0,
            accuracy=sum(ok for _, ok in items) / len(items) if items else 0.0,
        )
        for i, items in enumerate(members)
    ]


def ece(probs: Sequence[Sequence[float]], gold: Sequence[int], bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top label over ``bins`` equal-width bins."""
    return sum(b.count * abs(b.confidence - b.accuracy) for b in reliability(probs, gold, bins)) / len(gold)


def fit_temperature(scores: Sequence[Scores], gold: Sequence[int]) -> float:
    """The temperature in :data:`TEMPERATURE_RANGE` that minimises the NLL of ``gold`` under ``apply(scores, T)``,
    with a weak prior on ``log T`` (normal, sd :data:`PRIOR_SD`, centred on 1).

    The prior matters where the items are all (or nearly all) predicted right: the NLL alone then falls without end
    as ``T`` goes to 0, and a validation split with no mistakes would make every later mistake look certain. A grid
    over ``log T`` finds the region of the minimum, a golden-section search refines it.
    """
    _check(scores, gold)
    table = np.asarray(scores, dtype=np.float64)
    picked = table[np.arange(len(gold)), np.asarray(gold)]
    weight = 1 / (2 * PRIOR_SD**2 * len(gold))  # the prior's share of the mean NLL

    def loss(log_t: float) -> float:
        scaled = table / math.exp(log_t)
        top = scaled.max(axis=1)
        norms = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
        return float(np.mean(norms - picked / math.exp(log_t))) + weight * log_t**2

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    grid = np.linspace(low, high, _GRID)
    best = int(np.argmin([loss(x) for x in grid]))
    low, high = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, _GRID - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > _TOLERANCE:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)


def cross_fitted(scores: Sequence[Scores], gold: Sequence[int], folds: int = FOLDS) -> list[list[float]]:
    """Each item's probabilities under a temperature fitted on the other folds (item ``i`` is in fold ``i % folds``):
    what calibration does to items it was not fitted on."""
    _check(scores, gold)
    folds = max(2, min(folds, len(gold)))
    out: list[list[float]] = [[] for _ in gold]
    for fold in range(folds):
        rest = [i for i in range(len(gold)) if i % folds != fold]
        temperature = fit_temperature([scores[i] for i in rest], [gold[i] for i in rest])
        for i in range(fold, len(gold), folds):
            out[i] = apply(scores[i], temperature)
    return out


def measures(probs: Sequence[Sequence[float]], gold: Sequence[int]) -> dict[str, Any]:
    """NLL, Brier score, ECE and the reliability bins of one set of probabilities, rounded for a JSON record."""
    return {
        "nll": round(nll(probs, gold), 4),
        "brier": round(brier(probs, gold), 4),
        "ece": round(ece(probs, gold), 4),
        "reliability": [b.as_dict() for b in reliability(probs, gold)],
    }


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and whether to use it: ``applied`` when the cross-fitted NLL is below the raw one."""

    temperature: float
    applied: bool
    num_items: int
    nll_before: float
    nll_after: float  # cross-fitted

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": "temperature",
            "temperature": round(self.temperature, 4),
            "applied": self.applied,
            "num_items": self.num_items,
            "nll_before": round(self.nll_before, 4),
            "nll_after": round(self.nll_after, 4),
        }


def calibrate(scores: Sequence[Scores], gold: Sequence[int]) -> Calibration | None:
    """Fit a temperature on ``scores`` and decide whether it helps (None with fewer than :data:`MIN_ITEMS` items)."""
    if len(gold) < MIN_ITEMS:
        return None
    before = nll([apply(row) for row in scores], gold)
    after = nll(cross_fitted(scores, gold), gold)
    temperature = fit_temperature(scores, gold)
    return Calibration(temperature, after < before, len(gold), before, after)


def _check(rows: Sequence[Sequence[float]], gold: Sequence[int]) -> None:
    if not gold or len(rows) != len(gold):
        raise ValueError(f"need as many rows as gold labels, and at least one (got {len(rows)} and {len(gold)})")
