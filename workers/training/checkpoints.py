"""Training checkpoints: adapter, optimizer, scheduler, RNG, position and (fp16) the loss scaler, each written whole
or not at all.

A checkpoint is written into a temporary folder and renamed to ``step-NNNNNNNN``, so a folder with that name is
always complete; a crash mid-write leaves only a ``.tmp-`` folder that the next save or restore removes.
The data position is the step itself: the example order of each epoch is derived from (seed, epoch). On the fp16
plan the ``GradScaler``'s state (its current loss scale and growth tracker) is saved too, so a resumed job goes on with
the scale it had reached instead of starting again from the initial one (and skipping steps again to get back there).

Training checkpoints its last step too (``recipe.after_step``), so a job whose attempt died after training, while
it evaluated or published, resumes at the end and goes straight on to those instead of training again.

A checkpoint records the run it belongs to (``identity.json``: job id, base model, dataset and its sha256, the
hyperparameters but the micro-batch split, which the memory fallback changes between attempts of the same steps).
A run resumes only from its own (:func:`mismatch`); another run's, e.g. a job id reused over a DATA_DIR kept from
an earlier database, is not resumed from (the run starts at step 0 and says why) and goes at the run's first
checkpoint. A checkpoint written before identities were recorded is resumed from as before.

The rename and the pruning happen inside the run's fence (``Hooks.fence``): a job's worker lets only the attempt
that still holds the job rename or delete a checkpoint, so a stale attempt can neither add one a takeover would
resume from nor remove the ones it resumes from. The temporary folder is the attempt's own (its process id in the
name).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from service.core.layout import CHECKPOINT_STATE, checkpoint_name, checkpoints_dir, complete_checkpoints
from workers.training.spec import Fence, TrainingSpec, no_fence

KEEP = 2
IDENTITY = "identity.json"
# How a step is split into micro-batches: the memory fallback changes it between attempts of the same steps.
EXECUTION_ONLY = frozenset({"micro_batch_size", "gradient_accumulation_steps"})


complete = complete_checkpoints  # the contract lives in service/core/layout.py


def identity(spec: TrainingSpec) -> dict[str, Any]:
    """The run a checkpoint of ``spec`` belongs to, as ``identity.json`` records it (plain JSON values)."""
    hp = spec.hp.model_dump(mode="json", exclude=set(EXECUTION_ONLY))
    run = {"job_id": spec.job_id, "base_model": spec.base_model, "dataset": spec.dataset, "hyperparameters": hp}
    return {**run, "dataset_sha256": spec.dataset_sha256}


def save(
    job_dir: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    history: dict[str, Any],
    fence: Fence = no_fence,
    scaler: Any = None,
    run: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` (``scaler``: fp16's ``torch.amp.GradScaler``, None otherwise; ``run``: its
    :func:`identity`, recorded) and keep the newest ``KEEP``, removing every checkpoint of another run; the rename
    and the pruning inside ``fence``."""
    root = checkpoints_dir(job_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, step, model, optimizer, scheduler, history, scaler, run)
        with fence("checkpoint"):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _prune(job_dir, KEEP, run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write(
    tmp: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    history: dict[str, Any],
    scaler: Any = None,
    run: Mapping[str, Any] | None = None,
) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    if run is not None:  # before the trainer state, whose presence marks the checkpoint complete
        (tmp / IDENTITY).write_text(json.dumps(run, sort_keys=True))
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


def _recorded(path: Path) -> dict[str, Any] | None:
    """The identity checkpoint ``path`` records; None where it records none (written before identities were)."""
    try:
        recorded = json.loads((path / IDENTITY).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: it cannot be shown to be this run's
    return recorded if isinstance(recorded, dict) else {}


def _differing(path: Path, run: Mapping[str, Any]) -> list[str]:
    """The fields of ``run`` (:func:`identity`) that checkpoint ``path`` records otherwise (none recorded: [])."""
    recorded = _recorded(path)
    if recorded is None:
        return []
    run = json.loads(json.dumps(run))  # as the file holds it
    hp, recorded_hp = run.get("hyperparameters") or {}, recorded.get("hyperparameters") or {}
    fields = [k for k in _keys(run, recorded) if k != "hyperparameters" and run.get(k) != recorded.get(k)]
    return fields + [f"hyperparameters.{k}" for k in _keys(hp, recorded_hp) if hp.get(k) != recorded_hp.get(k)]


def _keys(own: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """The keys of both, ``own``'s order first."""
    return [*own, *(k for k in recorded if k not in own)]


def mismatch(job_dir: Path, run: Mapping[str, Any]) -> str | None:
    """Why the newest complete checkpoint is not one to resume run ``run`` (:func:`identity`) from, or None: there is
    none, it is this run's, or it records no identity."""
    found = complete(job_dir)
    if not found:
        return None
    differ = _differing(found[-1], run)
    if not differ:
        return None
    return f"checkpoint {found[-1].name} belongs to another run ({', '.join(differ[:6])} differ)"


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


def _prune(job_dir: Path, keep: int, run: Mapping[str, Any] | None = None) -> None:
    root = checkpoints_dir(job_dir)
    if not root.exists():
        return
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    found = complete(job_dir)
    if run is not None:  # another run's checkpoints go: they would be "newest" to this run's next resume
        for foreign in [path for path in found if _differing(path, run)]:
            shutil.rmtree(foreign, ignore_errors=True)
            found.remove(foreign)
    for old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
