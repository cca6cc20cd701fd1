"""Token-length statistics of a dataset under the job's tokenizer (computed at job time, in the training child)."""

from __future__ import annotations

import math
from typing import Any


def token_stats(lengths: list[int], max_length: int) -> dict[str, Any]:
    """p50/p90/p99/max of prompt+response lengths (with EOS) and the share longer than ``max_length``.

    The share matters because truncation cuts the response, which carries the label, off the end first.
    """
    lengths = sorted(lengths)
    if not lengths:
        return {"examples": 0}
    truncated = sum(1 for n in lengths if n > max_length)
    return {
        "examples": len(lengths),
        "p50": _nearest_rank(lengths, 0.50),
        "p90": _nearest_rank(lengths, 0.90),
        "p99": _nearest_rank(lengths, 0.99),
        "max": lengths[-1],
        "max_length": max_length,
        "truncated": truncated,
        "truncated_share": round(truncated / len(lengths), 4),
    }


def _nearest_rank(ordered: list[int], q: float) -> int:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def describe(stats: dict[str, Any]) -> str:
    if not stats.get("examples"):
        return "no examples to measure"
    return (
        f"{stats['examples']} examples: tokens p50 {stats['p50']}, p90 {stats['p90']}, p99 {stats['p99']}, "
        f"max {stats['max']}; {stats['truncated_share']:.1%} longer than max_length {stats['max_length']}"
    )
