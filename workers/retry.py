"""Retry policy: what a job's outcome means for its next state. Pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

BASE_DELAY_SECONDS = 2.0
MAX_DELAY_SECONDS = 300.0


@dataclass(frozen=True)
class Outcome:
    """What the training child reported (or what its exit said, when it reported nothing)."""

    # lease_lost: the attempt found the job no longer its own; the worker records nothing for it.
    status: Literal["succeeded", "failed", "interrupted", "oom", "crashed", "lease_lost"]
    error: dict[str, Any] | None = None
    retryable: bool = False
    adapter: str | None = None
    progress: dict[str, Any] | None = None


@dataclass(frozen=True)
class Decision:
    action: Literal["succeed", "fail", "retry"]
    delay_seconds: float = 0.0
    error: dict[str, Any] | None = None
    new_micro_batch: int | None = None


def backoff(attempts: int) -> float:
    return min(BASE_DELAY_SECONDS * 2 ** max(attempts - 1, 0), MAX_DELAY_SECONDS)


def decide(outcome: Outcome, attempts: int, max_attempts: int, micro_batch: int) -> Decision:
    if outcome.status == "succeeded":
        return Decision("succeed")
    if outcome.status == "interrupted":  # graceful stop: requeue now, resume from the checkpoint
        return Decision("retry", 0.0, {"type": "interrupted", "message": "worker stopped; job requeued", "hint": None})
    if outcome.status == "oom":
        if micro_batch <= 1:
            return Decision(
                "fail",
                error={
                    "type": "out_of_memory",
                    "message": "out of GPU memory at micro-batch 1",
                    "hint": "lower hyperparameters.max_length, use quantization 'nf4', or a GPU with more memory",
                },
            )
        half = micro_batch // 2
        message = f"out of GPU memory at micro-batch {micro_batch}; retrying with {half} and twice the accumulation"
        return Decision("retry", 0.0, {"type": "out_of_memory", "message": message, "hint": None}, half)
    error = outcome.error or {"type": "unknown", "message": "the training process ended without a result", "hint": None}
    if (outcome.retryable or outcome.status == "crashed") and attempts < max_attempts:
        return Decision("retry", backoff(attempts), error)
    if attempts >= max_attempts and (outcome.retryable or outcome.status == "crashed"):
        error = {**error, "hint": f"gave up after {attempts} attempts. {error.get('hint') or ''}".strip()}
    return Decision("fail", error=error)
