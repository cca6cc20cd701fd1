"""Recording a CUDA graph the way torch asks: warm up on a side stream, then capture once.

Used by every graph FlashTune captures: label scoring (``service.llm.scoring_graphs``), the decoding step
(``service.llm.decoding``) and the worker's forward-only validation pass (``workers.training.cuda.graphs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def record(run: Callable[[], T], pool: Any = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``run`` twice on a side stream (lazy initialisation and workspaces happen there, not in the capture),
    then record one call of it into a CUDA graph, in memory pool ``pool`` if given. Returns the graph and what the
    recorded call returned: tensors in the graph's memory, overwritten by each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph, output
