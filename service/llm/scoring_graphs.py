"""CUDA graphs of the scoring forward pass (``service.llm.scoring.group_logprobs``).

Label-only /analyze at batch 1 is one forward pass of a few hundred tokens, and on a 7B model it is bound by
launching kernels, not by the GPU: measured on an H200 (``bench/profile_label_gpu.py``), the merged bf16 copy's
pass took ~28 ms of wall time for ~18 ms of GPU work, and on the NF4 base bitsandbytes spends ~250 us of Python
per linear layer, ~53 ms per pass. A graph replays the whole pass with one launch.

A graph is captured per shape (rows, width, kept logits): the scorer pads a row's width to a multiple of
:data:`WIDTH_MULTIPLE` so that prompts of similar length share one, a batch's rows are padded up to the next of
:data:`ROW_BUCKETS` (a batch of 3 replays the graph of 4; the extra rows are ignored), and only small batches (at most
:data:`MAX_ROWS` rows: larger ones keep the GPU busy anyway) are graphed. A graph replays the memory addresses it was
captured with, so one :class:`ScoringGraphs` belongs to one model in one state (which adapter is active), and its
owner drops the graphs when the weights change (:meth:`ScoringGraphs.invalidate`: an adapter loaded or unloaded). If
capturing fails (a kernel that cannot be captured), scoring stays eager for that model.

Capturing takes a few passes (two warm-up runs and the recorded one). With ``defer`` (the serving engine), a pass
never captures: a shape without its graph runs eagerly and is remembered (with the same width at every row bucket),
and the owner captures what is pending later, one graph per :meth:`ScoringGraphs.capture_next`, from the model
thread while no request waits (``service.serving.engine``). Without it (benchmarks, tests) the first pass of a shape
captures it, as before.
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
ROW_BUCKETS = (1, 2, 4)  # a graphed batch's rows are padded up to one of these
MAX_ROWS = ROW_BUCKETS[-1]
Key = tuple[Any, ...]  # the padded inputs' shapes and the kept logits
Spec = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]  # each padded input's shape, dtype, device


def row_bucket(rows: int) -> int | None:
    """The rows a graphed batch of ``rows`` is padded to; None where it is not graphed (more than MAX_ROWS)."""
    return next((b for b in ROW_BUCKETS if b >= rows), None)


class Replayable(Protocol):
    def replay(self) -> None: ...


class ScoringGraphs:
    """The captured scoring passes of one model in one state, the least recently used dropped beyond ``limit``;
    with ``defer``, the shapes seen but not captured yet, captured by :meth:`capture_next` (see the module)."""

    def __init__(self, limit: int = 24, defer: bool = False) -> None:
        self.limit = limit
        self.defer = defer
        self.broken = False
        self._graphs: OrderedDict[Key, tuple[Replayable, tuple[torch.Tensor, ...], torch.Tensor]] = OrderedDict()
        self._wanted: OrderedDict[Key, tuple[Spec, int]] = OrderedDict()  # shapes to capture (defer), newest last
        self._pool: Any = None

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
        self._pool = None

    def forward(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, keep: int
    ) -> torch.Tensor | None:
        """The logits of ``model(...)`` with ``logits_to_keep=keep``, replayed from a graph; None where this shape is
        not graphed (too many rows, not captured yet with ``defer``, or capturing failed): the caller then runs the
        model itself."""
        rows = input_ids.shape[0]
        bucket = row_bucket(rows)
        if self.broken or bucket is None:
            return None
        inputs = (input_ids, attention_mask, position_ids)
        spec: Spec = tuple(((bucket, *t.shape[1:]), t.dtype, t.device) for t in inputs)
        key = (*(shape for shape, _, _ in spec), keep)
        if key not in self._graphs:
            if self.defer:
                for other in ROW_BUCKETS:  # the same width at every batch size
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
            return False
        self._graphs[key] = (graph, static, logits)
        self._wanted[key] = (spec, keep)
        self._wanted.move_to_end(key)
        self._trim()
        return True

    def _capture(self, run: Callable[[], torch.Tensor]) -> tuple[Replayable, torch.Tensor]:
        """Record ``run`` into a graph sharing this object's pool."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return record(run, self._pool)


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
