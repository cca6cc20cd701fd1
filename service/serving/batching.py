"""Micro-batching for /analyze: requests that arrive while a forward pass runs share the next one.

Request threads call :meth:`MicroBatcher.submit` and block on a future; one background thread takes what has
arrived (up to ``max_batch`` items: whatever queued up while the last pass ran, and, with ``max_wait_ms``, what
arrives that long after the first), groups it by the key each
request was submitted with (the serving model, :class:`~service.serving.engine.ModelServer`: the attached-adapter model
or a merged copy, and max_new_tokens; not the adapter, which travels with each request's payload so that
different adapters share a forward pass) and hands each group to the model in one call. If a group fails, its
items are retried one by one, so a request that fails does not take the others of its batch down with it.

:meth:`MicroBatcher.submit_async` is the hand-off of an ``async`` route: the request's future is resolved by the
batcher thread through the event loop's ``call_soon_threadsafe`` (``asyncio.wrap_future``), so no worker thread of
the API's pool sits blocked for the length of a pass. ``idle``: work the model thread does only while no request
waits (capturing CUDA graphs, ``service.serving.engine``), one short piece at a time, and only once no request has
arrived for ``idle_after_ms`` (a piece holds the model: a request that comes meanwhile waits for it, so steady
traffic is not interrupted); requests are looked at again after each piece, and :meth:`MicroBatcher.wake` tells the
thread there is such work when it sleeps on an empty queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[list[Any], Hashable], list[Any]]
Idle = Callable[[], bool]  # one piece of background work; True while more is left
log = logging.getLogger("flashtune.inference")
_WAKE = object()  # queued by wake(): not a request


@dataclass
class _Item:
    payload: Any
    group: Hashable
    future: Future[Any] = field(default_factory=Future)


class MicroBatcher:
    def __init__(
        self,
        run: RunBatch,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        idle: Idle | None = None,
        idle_after_ms: float = 50.0,
    ) -> None:
        self._run = run
        self._idle = idle
        self.idle_after = idle_after_ms / 1000
        self._last_arrival = 0.0  # time.monotonic() of the last request
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue[Any] = queue.Queue()  # _Item, or _WAKE
        self._thread = threading.Thread(target=self._loop, name="flashtune-batcher", daemon=True)
        self._thread.start()

    def submit_future(self, payload: Any, group: Hashable) -> Future[Any]:
        """Queue one request; its future is resolved by the batcher thread."""
        item = _Item(payload, group)
        self._last_arrival = time.monotonic()
        self._queue.put(item)
        return item.future

    def submit(self, payload: Any, group: Hashable, timeout: float | None = None) -> Any:
        """Queue one request and block the calling thread until it is served."""
        return self.submit_future(payload, group).result(timeout)

    async def submit_async(self, payload: Any, group: Hashable) -> Any:
        """Queue one request and await it on the running event loop, no thread waiting for it."""
        return await asyncio.wrap_future(self.submit_future(payload, group))

    def wake(self) -> None:
        """There is idle work: the batcher thread looks for it even if no request comes."""
        self._queue.put(_WAKE)

    def _next(self, timeout: float | None) -> _Item | None:
        """The next request (None: none within ``timeout``, 0: none queued now); wake-ups are skipped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                got = self._queue.get(timeout=remaining) if remaining != 0 else self._queue.get_nowait()
            except queue.Empty:
                return None
            if got is not _WAKE:
                return got  # type: ignore[no-any-return]

    def _gather(self) -> list[_Item]:
        """The next item, what arrives within ``max_wait`` after it, and whatever else is already queued, up to
        ``max_batch``: requests that queued up during the last pass always share the next one, even with no wait.
        Empty when only a wake-up came."""
        first = self._next(None if self._idle is None else 0)
        if first is None:
            quiet = self._last_arrival + self.idle_after - time.monotonic()
            if quiet > 0:  # requests came lately: more may follow, idle work waits
                first = self._next(quiet)
                if first is None:
                    return []
            elif not self._work_idle():
                got = self._queue.get()  # sleep until a request or a wake-up
                if got is _WAKE:
                    return []
                first = got
            else:
                return []
        items = [first]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            remaining = deadline - time.monotonic()
            got = self._next(remaining if remaining > 0 else 0)
            if got is None:
                break
            items.append(got)
        return items

    def _work_idle(self) -> bool:
        """One piece of idle work; whether more is left (False: sleep until a request or a wake-up)."""
        if self._idle is None:
            return False
        try:
            return self._idle()
        except Exception:  # idle work is an optimisation: never let it stop serving
            log.exception("background work of the model thread failed")
            return False

    def _loop(self) -> None:
        while True:
            items = self._gather()
            groups: dict[Hashable, list[_Item]] = {}
            for item in items:
                if item.future.set_running_or_notify_cancel():  # False: cancelled (its client went away)
                    groups.setdefault(item.group, []).append(item)
            for group, members in groups.items():
                self._run_group(group, members)

    def _run_group(self, group: Hashable, members: list[_Item]) -> None:
        try:
            results = self._run([m.payload for m in members], group)
            for member, result in zip(members, results, strict=True):
                member.future.set_result(result)
        except Exception as exc:
            if len(members) == 1:
                members[0].future.set_exception(exc)
                return
            for member in members:  # isolate the failing request
                self._run_group(group, [member])
