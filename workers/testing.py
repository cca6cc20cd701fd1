"""Test doubles for job processes: fault plugins the tests install with ``FLASHTUNE_FAULTS=workers.testing:<NAME>``.

A fault plugin (``workers.training.spec.FaultPlugin``) takes a run's hooks, its spec and the rank, and returns the
hooks to train with. ``workers.child`` loads the one named by ``FLASHTUNE_FAULTS`` once per job process (the child,
and each rank of a multi-GPU job) and wraps the hooks with it; unset, nothing is loaded and production code has no
fault branch. The faults are raised from ``on_progress``, after an optimizer step, where a real fault of that kind
would surface to the worker the same way.
"""

from __future__ import annotations

import dataclasses

import torch

from service.jobs.models import Progress
from workers.training.spec import FaultPlugin, Hooks, TrainingSpec


def oom_from_micro_batch(limit: int) -> FaultPlugin:
    """The first optimizer step raises ``torch.OutOfMemoryError`` while the job's micro-batch is ``limit`` or more:
    the memory fallback (``workers.retry``: halve the micro-batch, double the accumulation) tested on CPU."""

    def install(hooks: Hooks, spec: TrainingSpec, rank: int) -> Hooks:
        micro_batch = spec.hp.micro_batch_size
        if micro_batch < limit:
            return hooks

        def on_progress(progress: Progress, force: bool) -> None:
            raise torch.OutOfMemoryError(f"injected by workers.testing at micro-batch {micro_batch} (limit {limit})")

        return dataclasses.replace(hooks, on_progress=on_progress)

    return install


def rank_fails_after_step(rank: int, step: int) -> FaultPlugin:
    """Rank ``rank`` of a multi-GPU job raises after optimizer step ``step``: the job fails naming that rank, and no
    process outlives the attempt."""

    def install(hooks: Hooks, spec: TrainingSpec, this_rank: int) -> Hooks:
        if this_rank != rank:
            return hooks

        def on_progress(progress: Progress, force: bool) -> None:
            if progress.step == step:
                raise RuntimeError(f"injected by workers.testing: rank {rank} fails after step {step}")
            hooks.on_progress(progress, force)

        return dataclasses.replace(hooks, on_progress=on_progress)

    return install


# The plugins the tests name (FLASHTUNE_FAULTS takes a name, not arguments).
OOM_FROM_MICRO_BATCH_8 = oom_from_micro_batch(8)
RANK_1_FAILS_AFTER_STEP_2 = rank_fails_after_step(1, 2)
