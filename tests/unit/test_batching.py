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


def test_an_async_caller_awaits_without_a_thread() -> None:
    """submit_async: requests awaited on an event loop share a pass and get their own results."""
    import asyncio

    batches: list[list[int]] = []

    def run(payloads: list[Any], group: Any) -> list[Any]:
        batches.append(list(payloads))
        time.sleep(0.05)
        return [p * 10 for p in payloads]

    batcher = MicroBatcher(run, max_batch=32)

    async def main() -> list[Any]:
        first = asyncio.ensure_future(batcher.submit_async(0, "g"))
        while not batches:
            await asyncio.sleep(0.001)
        rest = await asyncio.gather(*(batcher.submit_async(i, "g") for i in range(1, 5)))
        return [await first, *rest]

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert [sorted(b) for b in batches] == [[0], [1, 2, 3, 4]]


def test_a_cancelled_request_is_skipped_and_the_batcher_goes_on() -> None:
    batcher, batches, release = _blocking_batcher(0.0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, 0, "g")
        while not batches:
            time.sleep(0.001)
        gone = batcher.submit_future(1, "g")
        assert gone.cancel()  # its client went away before the pass
        kept = batcher.submit_future(2, "g")
        release.set()
        assert first.result(5) == 0 and kept.result(5) == 20
    assert [sorted(b) for b in batches] == [[0], [2]]


def test_idle_work_runs_between_requests_one_piece_at_a_time() -> None:
    """The idle hook runs only while no request waits: a request that arrives during a piece is served before the
    next piece; a wake-up makes the thread look for idle work again."""
    events: list[str] = []
    pieces = [3]
    piece_started, release_piece = threading.Event(), threading.Event()

    def idle() -> bool:
        if pieces[0] == 0:
            return False
        pieces[0] -= 1
        events.append("piece")
        if pieces[0] == 2:  # the first piece waits until a request has queued
            piece_started.set()
            release_piece.wait(10)
        return pieces[0] > 0

    def run(payloads: list[Any], group: Any) -> list[Any]:
        events.append(f"request {payloads}")
        return payloads

    batcher = MicroBatcher(run, max_batch=8, idle=idle)
    batcher.wake()
    assert piece_started.wait(5)
    future = batcher.submit_future("a", "g")
    release_piece.set()
    assert future.result(5) == "a"
    deadline = time.monotonic() + 5
    while pieces[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == ["piece", "request ['a']", "piece", "piece"]
    pieces[0] = 1  # more work appears; the thread sleeps until told
    time.sleep(0.05)
    assert events[-1] == "piece" and pieces[0] == 1
    batcher.wake()
    deadline = time.monotonic() + 5
    while pieces[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pieces[0] == 0 and events.count("piece") == 4


def test_failing_idle_work_does_not_stop_serving() -> None:
    def idle() -> bool:
        raise RuntimeError("capture failed")

    batcher = MicroBatcher(lambda payloads, group: payloads, idle=idle)
    batcher.wake()
    assert batcher.submit("x", "g", timeout=5) == "x"


def test_idle_work_waits_for_a_quiet_moment() -> None:
    """Idle work starts only once no request has arrived for ``idle_after_ms``: steady traffic is not interrupted."""
    started: list[float] = []

    def idle() -> bool:
        started.append(time.monotonic())
        return False

    batcher = MicroBatcher(lambda payloads, group: payloads, idle=idle, idle_after_ms=300)
    arrived = time.monotonic()
    assert batcher.submit("x", "g", timeout=5) == "x"
    started.clear()  # the call when the thread started, before any request
    batcher.wake()
    deadline = time.monotonic() + 5
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started and started[0] - arrived >= 0.3
