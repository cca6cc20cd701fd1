"""CUDA graphs of the scoring forward pass (``service.llm.scoring.group_logprobs``).

Label-only /analyze at batch 1 is one forward pass of a few hundred tokens, and on a 7B model it is bound by
launching kernels, not by the GPU: measured on an H200 (``bench/profile_label_gpu.py``), the merged bf16 copy's
pass took ~28 ms of wall time for ~18 ms of GPU work, and on the NF4 base bitsandbytes spends ~250 us of Python
per linear layer, ~53 ms per pass. A graph replays the whole pass with one launch.

A graph is captured per shape (rows, width, kept logits) on first use: the scorer pads a row's width to a multiple of
:data:`WIDTH_MULTIPLE` so that prompts of similar length share one, and only small batches (at most
:data:`MAX_ROWS` rows: larger ones keep the GPU busy anyway) are graphed. A graph replays the memory addresses it was
captured with, so one :class:`ScoringGraphs` belongs to one model in one state (which adapter is active), and its
owner drops it when the weights change (an adapter loaded or unloaded). If capturing fails (a kernel that cannot be
captured), scoring stays eager for that model.
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
MAX_ROWS = 4


class Replayable(Protocol):
    def replay(self) -> None: ...


class ScoringGraphs:
    """The captured scoring passes of one model in one state, the least recently used dropped beyond ``limit``."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.broken = False
        self._graphs: OrderedDict[tuple[Any, ...], tuple[Replayable, tuple[torch.Tensor, ...], torch.Tensor]] = (
            OrderedDict()
        )
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def forward(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, keep: int
    ) -> torch.Tensor | None:
        """The logits of ``model(...)`` with ``logits_to_keep=keep``, replayed from a graph; None where this shape is
        not graphed (too many rows, or capturing failed): the caller then runs the model itself."""
        if self.broken or input_ids.shape[0] > MAX_ROWS:
            return None
        inputs = (input_ids, attention_mask, position_ids)
        key = (*(tuple(t.shape) for t in inputs), keep)
        if key not in self._graphs:
            static = tuple(t.clone() for t in inputs)

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
                return None
            self._graphs[key] = (graph, static, logits)
            while len(self._graphs) > self.limit:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static, logits = self._graphs[key]
        for target, value in zip(static, inputs, strict=True):
            target.copy_(value)
        graph.replay()
        return logits.clone()  # the graph's output buffer is overwritten by its next replay

    def _capture(self, run: Callable[[], torch.Tensor]) -> tuple[Replayable, torch.Tensor]:
        """Record ``run`` into a graph sharing this object's pool."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return record(run, self._pool)
