"""Micro-batching for /analyze: requests that arrive while a forward pass runs share the next one.

Request threads call :meth:`MicroBatcher.submit` and block on a future; one background thread takes what has
arrived (up to ``max_batch`` items: whatever queued up while the last pass ran, and, with ``max_wait_ms``, what
arrives that long after the first), groups it by the key each
request was submitted with (the serving model, :class:`~service.serving.engine.ModelServer`: the attached-adapter model
or a merged copy, and max_new_tokens; not the adapter, which travels with each request's payload so that
different adapters share a forward pass) and hands each group to the model in one call. If a group fails, its
items are retried one by one, so a request that fails does not take the others of its batch down with it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[list[Any], Hashable], list[Any]]


@dataclass
class _Item:
    payload: Any
    group: Hashable
    future: Future[Any] = field(default_factory=Future)


class MicroBatcher:
    def __init__(self, run: RunBatch, max_batch: int = 32, max_wait_ms: float = 0.0) -> None:
        self._run = run
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="flashtune-batcher", daemon=True)
        self._thread.start()

    def submit(self, payload: Any, group: Hashable, timeout: float | None = None) -> Any:
        item = _Item(payload, group)
        self._queue.put(item)
        return item.future.result(timeout)

    def _gather(self) -> list[_Item]:
        """The next item, what arrives within ``max_wait`` after it, and whatever else is already queued, up to
        ``max_batch``: requests that queued up during the last pass always share the next one, even with no wait."""
        items = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                items.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        while True:
            items = self._gather()
            groups: dict[Hashable, list[_Item]] = {}
            for item in items:
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
