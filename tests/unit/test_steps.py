"""The epoch order: shuffled per (seed, epoch), every sample once, steps of nearly equal tokens."""

from __future__ import annotations

import random

from workers.training.steps import balance_steps, epoch_order, max_step_tokens


def _lengths(count: int = 281, seed: int = 0) -> list[int]:
    """Sample lengths shaped like the user's seed instructions: ~140-250 tokens."""
    rng = random.Random(seed)
    return [rng.choice([140, 150, 160, 200, 230, 250]) + rng.randrange(10) for _ in range(count)]


def _totals(order: list[int], lengths: list[int], size: int) -> list[int]:
    return [sum(lengths[i] for i in order[s : s + size]) for s in range(0, len(order), size)]


def test_balanced_steps_keep_every_sample_and_each_steps_count() -> None:
    lengths = _lengths()
    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    balanced = balance_steps(list(shuffled), lengths, 16)
    assert sorted(balanced) == list(range(len(lengths)))
    assert len(balanced) == len(shuffled)  # steps of 16, the last one of 9, as before


def test_balancing_brings_the_fullest_step_to_the_mean() -> None:
    lengths, size = _lengths(), 16
    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    before = _totals(shuffled, lengths, size)
    after = _totals(balance_steps(list(shuffled), lengths, size), lengths, size)
    mean_step = sum(lengths) / len(before)
    assert max(before) > 1.05 * mean_step  # what the rows of one length had to be padded to
    assert max(after) <= mean_step + max(lengths)  # within one sample of the mean; in practice a few tokens
    assert sum(after) == sum(before)


def test_the_order_is_reproducible_and_differs_between_epochs() -> None:
    lengths, size = _lengths(), 16
    first = epoch_order(lengths, size, seed=42, epoch=0)
    assert epoch_order(list(lengths), size, seed=42, epoch=0) == first  # a resumed job sees the same steps
    second = epoch_order(lengths, size, seed=42, epoch=1)

    def pairs(order: list[int]) -> set[tuple[int, int]]:
        steps = [sorted(order[s : s + size]) for s in range(0, len(order), size)]
        return {(a, b) for step in steps for a in step for b in step if a < b}

    shared = len(pairs(first) & pairs(second)) / len(pairs(first))
    assert shared < 0.2  # the shuffle still decides which samples meet: ~1/17 of pairs by chance


def test_max_step_tokens_matches_the_balanced_order() -> None:
    lengths, size = _lengths(), 16
    most = max(max(_totals(epoch_order(lengths, size, 0, e), lengths, size)) for e in range(3))
    assert max_step_tokens(lengths, size, 3, seed=0) == most
