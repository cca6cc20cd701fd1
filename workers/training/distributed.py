"""Data-parallel training of one job over N processes (one per GPU; gloo processes on CPU), launched by torchrun.

``FLASHTUNE_GPUS=N`` (or ``all``, or ``flashtune worker --gpus N``) makes the job's child process the torchrun
agent: ``launch`` starts N ranks through ``torch.distributed.launcher.api.elastic_launch`` (the engine behind
``torchrun --standalone``), each running ``workers.child.rank_main``. NCCL on CUDA, gloo on CPU; NVLink multicast
stays off (``NCCL_NVLS_ENABLE=0``).

What each rank does differently from a single process (``Distributed``, used by ``workers.training.recipe.train``):

- takes every ``world``-th sample of each optimizer step's samples (``shard``): the optimizer step, the number of
  steps and the learning-rate schedule are those of one GPU;
- divides its summed loss by the step's target tokens over all ranks (``sum_int``) and sums the LoRA gradients
  over all ranks (``reduce_step``, one all_reduce of a flat buffer) before clipping: the update equals the
  single-process update on the same samples, so every rank keeps identical weights (no DDP wrapper needed);
- starts from rank 0's weights (``sync_start``); ranks > 0 draw their own dropout masks.

Rank 0 alone writes progress, events, checkpoints and the adapter; the stop decision (cancel, lease lost,
SIGTERM) is rank 0's, broadcast every step (``rank_hooks``), so all ranks stop after the same step. Each rank
writes its ``Outcome`` to ``rank-<r>.json`` in the attempt's run folder; ``combine`` turns them, and what the
launcher saw of ranks that died without one, into the attempt's single outcome, naming the rank that failed.

No process outlives the attempt: the launcher stops the other ranks when one fails (SIGTERM, then SIGKILL); on
SIGTERM it passes SIGTERM on and kills ranks not gone after ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (50 s here); ranks
die with the launcher (``PR_SET_PDEATHSIG``); the child leads its own process group, which the worker kills as a
whole when it must kill (lease lost, cancel, grace over).

Tests make a rank fail with a fault plugin (``workers.testing``), installed by ``workers.child`` around the rank's
hooks; nothing here knows about it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from service.jobs.models import Progress
from workers.retry import Outcome
from workers.training.spec import Hooks

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # rank 0 alone checkpoints and evaluates while the others wait
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ inside a rank
@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank ``rank`` of ``world``; ``world == 1`` is plain single-process training."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collective tensors live: cuda:<local rank> for NCCL, cpu for gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: Sequence[T]) -> list[T]:
        """This rank's share of an optimizer step's samples: every ``world``-th one, starting at ``rank``."""
        return list(rows) if self.world == 1 else list(rows[self.rank :: self.world])

    def sum_int(self, value: int) -> int:
        """``value`` summed over all ranks (the step's target tokens: the loss denominator)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return int(tensor.item())

    def reduce_step(self, params: list[torch.Tensor], loss: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """Sum the gradients of ``params``, the step's loss (a scalar tensor) and its token count over all ranks, in
        one all_reduce.

        A rank without samples in this step (fewer samples than ranks) contributes zeros.
        """
        if self.world == 1:
            return loss, tokens
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        scalars = torch.stack([loss.float().to(self.device), torch.tensor(float(tokens), device=self.device)])
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [scalars])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(p.dtype)
            offset += g.numel()
        return flat[-2], int(round(float(flat[-1].item())))

    def sync_start(self, params: list[torch.Tensor], seed: int, start_step: int) -> None:
        """Every rank starts from rank 0's weights; ranks > 0 reseed so their dropout masks differ from rank 0's."""
        if self.world == 1:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if self.rank > 0:  # rank 0 keeps its stream, so 1-GPU runs and resumes stay exactly as before
            torch.manual_seed(seed * 1_000_003 + self.rank * 7_919 + start_step)

    def decide_stop(self, wanted: bool) -> bool:
        """Rank 0's stop decision, the same on every rank."""
        if self.world == 1:
            return wanted
        flag = torch.tensor([1 if (wanted and self.is_main) else 0], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())


SINGLE = Distributed()


def rank_hooks(hooks: Hooks, dist: Distributed) -> Hooks:
    """The hooks of one rank: rank 0's progress and events only; rank 0's stop decision for all."""
    if dist.world == 1:
        return hooks

    def on_progress(progress: Progress, force: bool) -> None:
        if dist.is_main:
            hooks.on_progress(progress, force)

    def on_event(type: str, message: str, data: dict[str, Any]) -> None:
        if dist.is_main:
            hooks.on_event(type, message, data)

    def should_stop() -> bool:
        return dist.decide_stop(bool(hooks.should_stop()) if dist.is_main else False)

    return dataclasses.replace(hooks, on_progress=on_progress, on_event=on_event, should_stop=should_stop)


def init_rank(device: str, launcher_pid: int) -> Distributed:
    """Join the process group of a rank started by ``launch`` (RANK, WORLD_SIZE, MASTER_* come from torchrun)."""
    die_with_parent(signal.SIGKILL, launcher_pid)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=torch.device("cuda", local))
        return Distributed(rank, world, f"cuda:{local}")
    if "OMP_NUM_THREADS" not in os.environ:  # N CPU processes share the cores instead of each taking all of them
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    torch.distributed.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return Distributed(rank, world, "cpu")


def close_rank() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def die_with_parent(sig: int, expected_parent: int) -> None:
    """Linux: receive ``sig`` when the parent process ends (then at once if it already has). Elsewhere: nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def write_outcome(run_dir: Path, rank: int, outcome: Outcome) -> None:
    record = {"rank": rank, "time": time.time(), "outcome": dataclasses.asdict(outcome)}
    tmp = run_dir / f".rank-{rank}.json"
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, run_dir / f"rank-{rank}.json")


# ------------------------------------------------------------------------------------ in the job's child
def resolve_world_size(gpus: str, device: str) -> int:
    """How many processes train one job: ``gpus`` is ``all`` or a number; ``device`` is the resolved device.

    On CUDA ``all`` means every visible GPU and a number may not exceed them; on CPU a number N means N gloo
    processes (how multi-GPU training is tested without GPUs) and ``all`` means one.
    """
    if device != "cuda":
        return 1 if gpus == "all" else int(gpus)
    visible = torch.cuda.device_count()
    if gpus == "all":
        return max(visible, 1)
    if int(gpus) > visible:
        raise ValueError(
            f"FLASHTUNE_GPUS={gpus} but only {visible} CUDA device(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return int(gpus)


class StopRequested(Exception):
    """SIGTERM reached the child before the launcher had installed its own handler."""


def launch(entry: Callable[..., Any], args: tuple[Any, ...], world: int, run_dir: Path, run_id: str) -> Outcome:
    """Run ``entry(*args)`` in ``world`` ranks through torchrun's launcher and return the attempt's outcome.

    SIGTERM to this process (the worker stopping) reaches every rank as SIGTERM; rank 0 then checkpoints after
    its current step and all ranks stop (``Interrupted``).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    def stop(signum: int, _frame: Any) -> None:
        raise StopRequested(signal.Signals(signum).name)

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast (NVLS) off: inherited by every rank
    # Stopping (SIGTERM): the ranks get SIGTERM, finish their step, rank 0 checkpoints; ranks not gone after this
    # many seconds are killed (torchrun's default, 30 s, is short for a large model's step and checkpoint).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "50")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        local_addr="127.0.0.1",  # torchrun --standalone
        max_restarts=0,  # a failed attempt goes back to the worker's retry policy (workers/retry.py)
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "torchelastic")),
    )
    failures: dict[int, Any] = {}
    signalled, error = False, None
    handled = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]  # the launcher replaces these
    previous = {sig: signal.getsignal(sig) for sig in handled}
    signal.signal(signal.SIGTERM, stop)
    try:
        elastic_launch(config, entry)(*args)
    except ChildFailedError as exc:
        failures = dict(exc.failures)
    except (SignalException, StopRequested):
        signalled = True
    except Exception as exc:  # rendezvous or start-up of the ranks failed
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return combine(world, read_outcomes(run_dir), failures, signalled, error)


def read_outcomes(run_dir: Path) -> dict[int, tuple[float, Outcome]]:
    found: dict[int, tuple[float, Outcome]] = {}
    for path in run_dir.glob("rank-*.json"):
        record = json.loads(path.read_text())
        found[int(record["rank"])] = (float(record["time"]), Outcome(**record["outcome"]))
    return found


def combine(
    world: int, outcomes: dict[int, tuple[float, Outcome]], failures: dict[int, Any], signalled: bool, error: str | None
) -> Outcome:
    """The attempt's outcome from each rank's own outcome and the launcher's failures (ranks that died silently).

    Rank 0 decides success, an interrupt and a lost lease. Otherwise the cause is a rank killed by a signal if
    any (the others' errors follow from it), else the rank whose failure came first; its message names it.
    """
    main = outcomes.get(0)
    if main is not None and main[1].status in ("succeeded", "interrupted", "lease_lost"):
        return main[1]
    silent = {rank: f for rank, f in failures.items() if rank not in outcomes}
    killed = sorted(rank for rank, f in silent.items() if f.exitcode < 0)
    if killed:
        rank = killed[0]
        return _crashed(f"rank {rank} of {world} (pid {silent[rank].pid}) {_signal_reason(silent[rank].exitcode)}")
    failed: list[tuple[float, int, Outcome | None]] = [
        (t, rank, o) for rank, (t, o) in outcomes.items() if o.status not in ("succeeded", "interrupted")
    ]
    failed += [(float(f.timestamp), rank, None) for rank, f in silent.items()]
    if failed:
        _, rank, outcome = min(failed, key=lambda item: (item[0], item[1]))
        if outcome is None:  # it died before it could write its outcome (e.g. joining the process group)
            failure = silent[rank]
            return _crashed(
                f"rank {rank} of {world} (pid {failure.pid}) exited with code {failure.exitcode}: {failure.message}"
            )
        base = outcome.error or {"type": outcome.status, "message": outcome.status, "hint": None}
        return dataclasses.replace(
            outcome, error={**base, "message": f"rank {rank} of {world} failed: {base.get('message')}"}
        )
    if signalled:
        return Outcome("interrupted")
    reason = error or "the training processes ended without a result"
    return _crashed(f"distributed training over {world} processes failed: {reason}")


def _crashed(message: str) -> Outcome:
    hint = "the job is retried; if it keeps crashing, lower batch_size or max_length"
    return Outcome("crashed", {"type": "rank_crashed", "message": message, "hint": hint})


def _signal_reason(exitcode: int) -> str:
    name = signal.Signals(-exitcode).name
    extra = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
    return f"was killed by {name}{extra}"
