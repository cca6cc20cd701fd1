"""Which samples share an optimizer step: the epoch's shuffle, with the steps' token counts evened out.

Why even them out: on CUDA every packed row of a job is padded to one length, the job's longest step (a CUDA
graph has one shape, ``workers.training.cuda.plan``), so a step with fewer tokens spends compute on filler. With 16
random ~150-token samples per step, the longest of the user's 33 steps holds ~10% more tokens than the mean step (2,672
against ~2,430 with the seed instructions), and every other step pads up to it.

:func:`balance_steps` swaps samples between the fullest and the emptiest steps until no swap lowers the fullest.
What stays as before: each step has ``batch_size`` samples (the last one of an epoch fewer), every sample is seen
once per epoch, and the order is derived from (seed, epoch) only, so a resumed job sees the same steps. What
changes: a few samples per step move to another step of the same epoch, so the steps hold nearly equal token
counts; which samples meet in a step is still decided by the shuffle, differently every epoch.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, balanced: bool = True) -> list[int]:
    """The example order of an epoch (``lengths``: each example's tokens): shuffled from (seed, epoch), then
    balanced so that each run of ``batch_size`` examples, one optimizer step, holds about as many tokens
    (``balanced=False``: as shuffled, how the worker ordered them before; the GPU benchmark compares the two)."""
    return list(_epoch_order(tuple(lengths), batch_size, seed, epoch, balanced))


@functools.lru_cache(maxsize=8)  # the loop asks once per step; balancing a large epoch takes a moment
def _epoch_order(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int, balanced: bool) -> tuple[int, ...]:
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(balance_steps(order, lengths, batch_size) if balanced else order)


def balance_steps(order: list[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """``order`` with samples swapped between its steps (runs of ``batch_size``) until no swap lowers the step
    with the most tokens. Each swap moves a longer sample out of the fullest step and a shorter one in from the
    emptiest step that has such a pair, choosing the pair that brings the two totals closest together."""
    steps = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    totals = [sum(lengths[i] for i in step) for step in steps]
    for _ in range(len(order)):  # a bound, rarely reached: each swap strictly narrows the spread of the totals
        fullest = max(range(len(steps)), key=totals.__getitem__)
        swap = None
        for other in sorted(range(len(steps)), key=totals.__getitem__):
            swap = _best_swap(steps[fullest], steps[other], totals[fullest] - totals[other], lengths)
            if swap is not None:
                break
        if swap is None:
            break
        a, b, moved = swap
        steps[fullest][a], steps[other][b] = steps[other][b], steps[fullest][a]
        totals[fullest] -= moved
        totals[other] += moved
    return [i for step in steps for i in step]


def _best_swap(full: list[int], other: list[int], gap: int, lengths: Sequence[int]) -> tuple[int, int, int] | None:
    """(position in ``full``, position in ``other``, tokens moved) of the swap that leaves the two steps closest,
    among those that lower both below the fuller one's total (0 < moved < gap); None if there is none."""
    best: tuple[int, int, int] | None = None
    for a, x in enumerate(full):
        for b, y in enumerate(other):
            moved = lengths[x] - lengths[y]
            if 0 < moved < gap and (best is None or abs(gap - 2 * moved) < abs(gap - 2 * best[2])):
                best = (a, b, moved)
    return best


def max_step_tokens(
    lengths: list[int],
    batch_size: int,
    epochs: int,
    seed: int,
    shard: Callable[[list[int]], list[int]] = list,
    balanced: bool = True,
) -> int:
    """The most tokens any optimizer step of the job will hold on this rank (``shard``: the rank's share of a
    step's samples); the CUDA path sizes its packed rows to it."""
    most = 0
    for epoch in range(epochs):
        order = epoch_order(lengths, batch_size, seed, epoch, balanced)
        for i in range(0, len(order), batch_size):
            most = max(most, sum(lengths[j] for j in shard(order[i : i + batch_size])))
    return most
