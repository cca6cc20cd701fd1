"""Multi-GPU training (issue #9), the pure parts: how each step is shared between ranks, which rank's failure is
reported, and the GPUs setting. Ranks launched through torchrun on gloo are in tests/integration/test_distributed.py."""

from __future__ import annotations

import pytest

from workers.retry import Outcome
from workers.training import distributed
from workers.training.distributed import Distributed


def test_shard_splits_each_step_between_ranks() -> None:
    rows = list(range(7))
    shares = [Distributed(rank, 3).shard(rows) for rank in range(3)]
    assert sorted(sum(shares, [])) == rows and [len(s) for s in shares] == [3, 2, 2]
    assert Distributed(1, 2).shard([0]) == []  # fewer samples than ranks: this rank adds zero gradients
    assert Distributed().shard(rows) == rows


class _Failure:
    def __init__(self, pid: int, exitcode: int, message: str = "", timestamp: int = 0) -> None:
        self.pid, self.exitcode, self.message, self.timestamp = pid, exitcode, message, timestamp


def test_combine_names_the_rank_that_failed_first() -> None:
    boom = Outcome("failed", {"type": "training_error", "message": "RuntimeError: boom", "hint": "h"})
    gloo = Outcome("failed", {"type": "training_error", "message": "RuntimeError: Connection closed", "hint": "h"})
    result = distributed.combine(2, {0: (20.0, gloo), 1: (10.0, boom)}, {}, False, None)
    assert result.status == "failed" and result.error is not None
    assert result.error["message"] == "rank 1 of 2 failed: RuntimeError: boom" and result.error["hint"] == "h"
    # a rank killed by a signal (no outcome of its own) is the cause; the others' errors follow from it
    killed = distributed.combine(4, {0: (20.0, gloo)}, {3: _Failure(4242, -9)}, False, None)
    assert killed.status == "crashed" and killed.error is not None
    assert killed.error["message"].startswith("rank 3 of 4 (pid 4242) was killed by SIGKILL")
    # rank 0 decides success, interrupt and a lost lease
    done = Outcome("succeeded", adapter="job-1")
    assert distributed.combine(2, {0: (1.0, done), 1: (1.0, Outcome("succeeded"))}, {}, False, None) == done
    assert distributed.combine(2, {}, {}, True, None).status == "interrupted"
    assert distributed.combine(2, {}, {}, False, "RendezvousError: x").status == "crashed"


def test_gpus_setting_and_world_size() -> None:
    from pydantic import ValidationError

    from service.core.config import Settings

    assert Settings(gpus="all").gpus == "all" and Settings(gpus="2").gpus == "2"
    with pytest.raises(ValidationError):
        Settings(gpus="0")
    assert distributed.resolve_world_size("2", "cpu") == 2 and distributed.resolve_world_size("all", "cpu") == 1
