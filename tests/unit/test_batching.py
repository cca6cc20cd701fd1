"""The micro-batcher: what shares a forward pass, and what happens when a pass fails."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from service.serving.batching import MicroBatcher


def _blocking_batcher(max_wait_ms: float) -> tuple[MicroBatcher, list[list[int]], threading.Event]:
    """A batcher whose first pass waits for ``release``: requests sent meanwhile queue up behind it."""
    batches: list[list[int]] = []
    release = threading.Event()

    def run(payloads: list[Any], group: Any) -> list[Any]:
        batches.append(list(payloads))
        if len(batches) == 1:
            release.wait(10)
        return [p * 10 for p in payloads]

    return MicroBatcher(run, max_batch=32, max_wait_ms=max_wait_ms), batches, release


@pytest.mark.parametrize("max_wait_ms", [0.0, 5.0])
def test_requests_queued_during_a_pass_share_the_next_one(max_wait_ms: float) -> None:
    batcher, batches, release = _blocking_batcher(max_wait_ms)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.submit, 0, "g")
        while not batches:  # the first pass has started and holds the model
            time.sleep(0.001)
        rest = [pool.submit(batcher.submit, i, "g") for i in range(1, 6)]
        while batcher._queue.qsize() < 5:
            time.sleep(0.001)
        release.set()
        assert first.result(5) == 0 and [f.result(5) for f in rest] == [10, 20, 30, 40, 50]
    assert [sorted(b) for b in batches] == [[0], [1, 2, 3, 4, 5]]  # not split, even without a wait


def test_a_failing_request_fails_alone() -> None:
    def run(payloads: list[Any], group: Any) -> list[Any]:
        if "bad" in payloads:
            raise ValueError("bad input")
        return payloads

    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=20)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.submit, p, "g") for p in ("a", "bad", "b")]
        assert futures[0].result(5) == "a" and futures[2].result(5) == "b"
        with pytest.raises(ValueError, match="bad input"):
            futures[1].result(5)
