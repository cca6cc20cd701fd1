"""Training checkpoints: adapter, optimizer, scheduler, RNG, position and (fp16) the loss scaler, each written whole
or not at all.

A checkpoint is written into a temporary folder and renamed to ``step-NNNNNNNN``, so a folder with that name is
always complete; a crash mid-write leaves only a ``.tmp-`` folder that the next save or restore removes.
The data position is the step itself: the example order of each epoch is derived from (seed, epoch). On the fp16
plan the ``GradScaler``'s state (its current loss scale and growth tracker) is saved too, so a resumed job goes on with
the scale it had reached instead of starting again from the initial one (and skipping steps again to get back there).

The rename and the pruning happen inside the run's fence (``Hooks.fence``): a job's worker lets only the attempt
that still holds the job rename or delete a checkpoint, so a stale attempt can neither add one a takeover would
resume from nor remove the ones it resumes from. The temporary folder is the attempt's own (its process id in the
name).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from service.core.layout import CHECKPOINT_STATE, checkpoint_name, checkpoints_dir, complete_checkpoints
from workers.training.spec import Fence, no_fence

KEEP = 2


complete = complete_checkpoints  # the contract lives in service/core/layout.py


def save(
    job_dir: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    history: dict[str, Any],
    fence: Fence = no_fence,
    scaler: Any = None,
) -> Path:
    """Write checkpoint ``step`` (``scaler``: fp16's ``torch.amp.GradScaler``, None otherwise) and keep the newest
    ``KEEP``; the rename and the pruning inside ``fence``."""
    root = checkpoints_dir(job_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, step, model, optimizer, scheduler, history, scaler)
        with fence("checkpoint"):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _prune(job_dir, KEEP)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write(
    tmp: Path, step: int, model: Any, optimizer: Any, scheduler: Any, history: dict[str, Any], scaler: Any = None
) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if scaler is not None:  # plain numbers: the scale, its growth and backoff factors, the growth tracker
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp / CHECKPOINT_STATE)
    (tmp / "history.json").write_text(json.dumps(history))


def restore(
    job_dir: Path, model: Any, optimizer: Any, scheduler: Any, history: dict[str, Any], scaler: Any = None
) -> int:
    """Load the newest complete checkpoint into the given objects; returns its step (0 when there is none).
    ``scaler`` (fp16) takes the loss scale the checkpoint saved; one saved without a scaler (a bf16 or CPU attempt)
    leaves it at its initial scale."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = complete(job_dir)
    if not found:
        return 0
    path = found[-1]
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors"), device=str(device)))
    # Our own file, but still no arbitrary unpickling: tensors and plain containers only.
    state = torch.load(path / CHECKPOINT_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    history.update(json.loads((path / "history.json").read_text()))
    return int(state["step"])


def prune(job_dir: Path, keep: int, fence: Fence = no_fence) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and leftovers of interrupted writes."""
    with fence("prune"):
        _prune(job_dir, keep)


def _prune(job_dir: Path, keep: int) -> None:
    root = checkpoints_dir(job_dir)
    if not root.exists():
        return
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    found = complete(job_dir)
    for old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
