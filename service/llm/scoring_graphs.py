"""CUDA graphs of the scoring forward pass (``service.llm.scoring.group_logprobs``).

Label-only /analyze at batch 1 is one forward pass of a few hundred tokens, and on a 7B model it is bound by
launching kernels, not by the GPU: measured on an H200 (``bench/profile_label_gpu.py``), the merged bf16 copy's
pass took ~28 ms of wall time for ~18 ms of GPU work, and on the NF4 base bitsandbytes spends ~250 us of Python
per linear layer, ~53 ms per pass. A graph replays the whole pass with one launch, and needs the GIL only to copy
the inputs in: over HTTP the event loop competes for it, so an eager pass there is slower than in process.

A graph is captured per shape (rows, width, kept logits): the scorer pads a row's width to a multiple of
:data:`WIDTH_MULTIPLE` so that prompts of similar length share one, and a batch's rows are padded up to the next of
:data:`ROW_BUCKETS` (a batch of 24 replays the graph of 32; the padded rows hold whatever valid inputs an earlier
pass left there, each row is computed apart from the others, and only the batch's own rows are read). Every batch
size the micro-batcher makes is graphed (``max_rows``: ``batch_max_size``, 32 by default); a larger batch
(``POST /analyze/batch`` of more texts) runs eagerly, where it keeps the GPU busy anyway. A width is wanted at every
bucket of its pass at once (:data:`ONE_PASS_ROWS`: ``classify`` scores one text in one pass and more in two, so a
one-pass shape is wanted at 1 row and a two-pass shape at 2 rows and up).

A graph replays the memory addresses it was captured with, so one :class:`ScoringGraphs` belongs to one model in one
state (which adapter is active), and its owner drops the graphs when the weights change
(:meth:`ScoringGraphs.invalidate`: an adapter loaded or unloaded). If capturing fails (a kernel that cannot be
captured), scoring stays eager for that model. The graphs of one model, in all its states, share one memory pool
(:class:`GraphPool`): a pass's intermediates are reused from graph to graph (they never run at once: one model
thread), so a graph costs its logits (rows x kept places x vocabulary, 2 bytes each: ~200 MB for 32 rows of the 7B
shape's first pass, ~1.4 GB for the 33 shapes of the three probe widths, ``service.serving.engine``) and the pool
holds the largest pass's workspace once. :class:`ScoringGraphs` keeps at most ``limit`` shapes, the least recently
used dropped.

Capturing takes a few passes (two warm-up runs and the recorded one) and holds the model. With ``defer`` (the
serving engine), a pass never captures: a shape without its graph runs eagerly and is remembered (with the same
width at every row bucket of its pass), and the owner captures what is pending later, one graph per
:meth:`ScoringGraphs.capture_next`, from the model thread while no request waits (``service.serving.engine``). The
engine scores probe texts when the base loads, so that the shapes of news items of ordinary length are captured
while ``/readyz`` says ``warming``, before traffic, and again after the adapters change; a shape met later (a
longer text) is captured the same way, between requests, so a request that arrives meanwhile waits for one capture
at most (three passes of that shape) and the ones after it replay. Without ``defer`` (benchmarks, tests) the first
pass of a shape captures it, as before.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch

from service.llm.graph_capture import record

log = logging.getLogger("flashtune.inference")
WIDTH_MULTIPLE = 64
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a graphed batch's rows are padded up to one of these
MAX_ROWS = ROW_BUCKETS[-1]  # at most; ScoringGraphs(max_rows) graphs up to the bucket that holds max_rows
ONE_PASS_ROWS = 1  # classify scores up to this many texts in one pass (service.llm.scoring.ONE_PASS_MAX_TEXTS)
Key = tuple[Any, ...]  # the padded inputs' shapes and the kept logits
Spec = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]  # each padded input's shape, dtype, device


def row_bucket(rows: int, max_rows: int = MAX_ROWS) -> int | None:
    """The rows a graphed batch of ``rows`` is padded to; None where it is not graphed (more rows than the bucket
    that holds ``max_rows``)."""
    last = next((b for b in ROW_BUCKETS if b >= max_rows), MAX_ROWS)
    return next((b for b in ROW_BUCKETS if rows <= b <= last), None)


def same_pass(bucket: int, max_rows: int = MAX_ROWS) -> list[int]:
    """The row buckets whose batches ``classify`` scores in the same passes as one of ``bucket`` rows (one pass up
    to ONE_PASS_ROWS, two above), up to the bucket that holds ``max_rows``: where a width seen at ``bucket`` is
    wanted."""
    return [
        b for b in ROW_BUCKETS if row_bucket(b, max_rows) == b and (b <= ONE_PASS_ROWS) == (bucket <= ONE_PASS_ROWS)
    ]


class Replayable(Protocol):
    def replay(self) -> None: ...


class GraphPool:
    """The CUDA-graph memory pool that the scoring graphs of one model share, in all its states (see the module).
    Made anew by :meth:`reset` when the graphs are dropped together (the weights change). It holds the first graph
    recorded in it: torch refuses to record into a pool whose graphs are all gone (an LRU may drop them all)."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._anchor: Any = None

    def handle(self) -> Any:
        """The pool's handle, for ``torch.cuda.graph(pool=...)``."""
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle

    def recorded(self, graph: Any) -> None:
        """A graph was recorded in the pool: the first one keeps it alive."""
        if self._anchor is None:
            self._anchor = graph

    def reset(self) -> None:
        """The next graph starts a new pool; this one is freed with the last of its graphs."""
        self._handle = self._anchor = None


class ScoringGraphs:
    """The captured scoring passes of one model in one state, the least recently used dropped beyond ``limit``;
    batches of up to ``max_rows`` graphed; with ``defer``, the shapes seen but not captured yet, captured by
    :meth:`capture_next`; ``pool``: the model's shared pool (default: one of its own). See the module."""

    def __init__(
        self, limit: int = 48, defer: bool = False, max_rows: int = MAX_ROWS, pool: GraphPool | None = None
    ) -> None:
        self.limit = limit
        self.defer = defer
        self.max_rows = max_rows
        self.broken = False
        self._graphs: OrderedDict[Key, tuple[Replayable, tuple[torch.Tensor, ...], torch.Tensor]] = OrderedDict()
        self._wanted: OrderedDict[Key, tuple[Spec, int]] = OrderedDict()  # shapes to capture (defer), newest last
        self._pool = pool if pool is not None else GraphPool()

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def pending(self) -> int:
        """Shapes waiting to be captured (with ``defer``)."""
        return 0 if self.broken else sum(1 for key in self._wanted if key not in self._graphs)

    def shapes(self) -> list[tuple[Key, Spec, int]]:
        """Every shape this object has captured or wants, as :meth:`want` takes them."""
        return [(key, spec, keep) for key, (spec, keep) in self._wanted.items()]

    def want(self, key: Key, spec: Spec, keep: int) -> None:
        """Capture this shape at the next :meth:`capture_next` (what another object of the same model saw)."""
        self._wanted[key] = (spec, keep)
        self._wanted.move_to_end(key)
        self._trim()

    def _trim(self) -> None:
        """At most ``limit`` shapes, the least recently wanted or used dropped with their graphs."""
        while len(self._wanted) > self.limit:
            dropped, _ = self._wanted.popitem(last=False)
            self._graphs.pop(dropped, None)

    def invalidate(self) -> None:
        """Drop the graphs (the weights they replay change), keeping their shapes to capture again."""
        self._graphs.clear()
        self._pool.reset()

    def forward(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, keep: int
    ) -> torch.Tensor | None:
        """The logits of ``model(...)`` with ``logits_to_keep=keep``, replayed from a graph; None where this shape is
        not graphed (too many rows, not captured yet with ``defer``, or capturing failed): the caller then runs the
        model itself."""
        rows = input_ids.shape[0]
        bucket = row_bucket(rows, self.max_rows)
        if self.broken or bucket is None:
            return None
        inputs = (input_ids, attention_mask, position_ids)
        spec: Spec = tuple(((bucket, *t.shape[1:]), t.dtype, t.device) for t in inputs)
        key = (*(shape for shape, _, _ in spec), keep)
        if key not in self._graphs:
            if self.defer:
                for other in same_pass(bucket, self.max_rows):  # the same width at every batch size of this pass
                    other_spec: Spec = tuple(((other, *shape[1:]), dtype, device) for shape, dtype, device in spec)
                    self.want((*(shape for shape, _, _ in other_spec), keep), other_spec, keep)
                self.want(key, spec, keep)  # the shape in use now first
                return None
            if not self._record(model, key, spec, keep, inputs):
                return None
        self._wanted.move_to_end(key)
        graph, static, logits = self._graphs[key]
        for target, value in zip(static, inputs, strict=True):
            target[:rows].copy_(value)  # rows beyond: whatever an earlier pass left there, valid inputs all the same
        graph.replay()
        return logits[:rows].clone()  # the graph's output buffer is overwritten by its next replay

    def capture_next(self, model: Any) -> bool:
        """Capture the most recently wanted shape that has no graph (``model`` in the state this object belongs to);
        whether one was pending."""
        if self.broken:
            return False
        key = next((k for k in reversed(self._wanted) if k not in self._graphs), None)
        if key is None:
            return False
        spec, keep = self._wanted[key]
        with torch.no_grad():
            self._record(model, key, spec, keep, placeholders(spec))
        return True

    def _record(self, model: Any, key: Key, spec: Spec, keep: int, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Capture the pass of shape ``key`` reading a padded copy of ``inputs``; False where capturing failed."""
        static = placeholders(spec)
        for target, value in zip(static, inputs, strict=True):
            target[: value.shape[0]].copy_(value)

        def run() -> torch.Tensor:
            ids, mask, positions = static
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False
            )
            return out.logits  # type: ignore[no-any-return]

        try:
            graph, logits = self._capture(run)
        except Exception as exc:  # noqa: BLE001 - any failure to capture leaves scoring eager
            log.warning("scoring stays eager: capturing a CUDA graph failed (%s)", exc)
            self.broken = True
            self._graphs.clear()
            self._pool.reset()
            return False
        self._graphs[key] = (graph, static, logits)
        self._wanted[key] = (spec, keep)
        self._wanted.move_to_end(key)
        self._trim()
        return True

    def _capture(self, run: Callable[[], torch.Tensor]) -> tuple[Replayable, torch.Tensor]:
        """Record ``run`` into a graph in the model's shared pool."""
        graph, logits = record(run, self._pool.handle())
        self._pool.recorded(graph)
        return graph, logits


def placeholders(spec: Spec) -> tuple[torch.Tensor, ...]:
    """Inputs of the given shapes that a pass can run on: token 0 at position 0, each place seeing itself (a boolean
    mask: the identity; an additive one: all zeros)."""
    out = []
    for shape, dtype, device in spec:
        if dtype == torch.bool:  # (rows, 1, width, width)
            out.append(torch.eye(shape[-1], dtype=torch.bool, device=device).expand(shape).clone())
        else:
            out.append(torch.zeros(shape, dtype=dtype, device=device))
    return tuple(out)
