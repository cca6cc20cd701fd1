"""Checkpoints of the fp16 plan (issue 21): the ``GradScaler``'s state is saved with a checkpoint, inside its fence,
and restored on resume, so a resumed job goes on with the loss scale it had reached instead of the initial one (and
does not skip steps again to get back there). On the CPU: ``torch.amp.GradScaler("cpu")`` keeps the same state as the
CUDA one, and a tiny peft model stands in for the base. Also: a checkpoint records the run it belongs to, and a run
resumes only from its own (``checkpoints.mismatch``, ``recipe._resume``)."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from workers.training import checkpoints, recipe


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _run() -> tuple[Any, Any, Any]:
    """A LoRA model (peft on a tiny module), its AdamW and a constant schedule."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=2, target_modules=["proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _steps(model: Any, optimizer: Any, scaler: torch.amp.GradScaler, overflows: list[bool]) -> None:
    """Optimizer steps through ``scaler`` as the recipe takes them; an overflowing one is skipped (scale halved)."""
    for overflow in overflows:
        loss = model(torch.ones(1, 4)).sum() * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()


def test_the_loss_scale_resumes_where_the_checkpoint_left_it(tmp_path: Path) -> None:
    model, optimizer, scheduler = _run()
    scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    _steps(model, optimizer, scaler, [True, True, False, False])  # two skipped, then two of three towards growth
    reached = scaler.state_dict()
    assert reached["scale"] == 2.0**14 and reached["_growth_tracker"] == 2
    fenced: list[str] = []

    def fence(action: str) -> Any:
        fenced.append(action)
        return contextlib.nullcontext()

    history = {"step_loss": [[4, 1.0]], "skipped_steps": [2]}
    checkpoints.save(tmp_path, 4, model, optimizer, scheduler, history, fence, scaler)
    assert fenced == ["checkpoint"]

    model, optimizer, scheduler = _run()
    resumed = torch.amp.GradScaler("cpu", growth_interval=3)
    restored: dict[str, Any] = {}
    assert checkpoints.restore(tmp_path, model, optimizer, scheduler, restored, resumed) == 4
    assert resumed.state_dict() == reached and restored["skipped_steps"] == [2]
    _steps(model, optimizer, resumed, [False])  # the third good step in a row: the scale grows, as it would have
    assert resumed.get_scale() == 2.0**15


def test_a_checkpoint_without_a_scaler_leaves_the_initial_scale(tmp_path: Path) -> None:
    """A checkpoint of a bf16 or CPU attempt resumed on the fp16 plan starts from the initial scale; one with a scaler
    resumed without one (bf16) loads the rest as before."""
    model, optimizer, scheduler = _run()
    checkpoints.save(tmp_path, 2, model, optimizer, scheduler, {})
    scaler = torch.amp.GradScaler("cpu")
    assert checkpoints.restore(tmp_path, model, optimizer, scheduler, {}, scaler) == 2
    assert scaler.get_scale() == 2.0**16
    checkpoints.save(tmp_path, 3, model, optimizer, scheduler, {}, scaler=scaler)
    assert checkpoints.restore(tmp_path, *_run(), {}) == 3


def test_a_skipped_step_is_counted_in_the_checkpointed_history() -> None:
    events: list[dict[str, Any]] = []
    run = SimpleNamespace(
        skipped_steps=2,  # by an earlier attempt (setup reads them back from the restored history)
        history={"step_loss": []},
        scaler=torch.amp.GradScaler("cpu"),
        hooks=SimpleNamespace(on_event=lambda type, message, data: events.append(data)),
    )
    recipe._report_skipped(run, 7)  # type: ignore[arg-type]
    assert run.history["skipped_steps"] == [3] and events[-1]["skipped_steps"] == 3


def _identity(tmp_path: Path, **hp: object) -> tuple[Any, dict[str, Any]]:
    from tests.conftest import builtin_spec

    spec = builtin_spec(tmp_path, tmp_path / "no-model", **hp)
    return spec, checkpoints.identity(spec)


def test_a_checkpoint_of_another_run_is_not_resumed_from_and_goes_at_the_first_checkpoint(tmp_path: Path) -> None:
    """Job 1's folder holds job 7's checkpoints (a job id reused over a kept DATA_DIR): job 1 starts at step 0 with
    an event that says why, and its first checkpoint removes them, however new they are."""
    spec, own = _identity(tmp_path)
    other = {**own, "job_id": 7, "dataset_sha256": "ab" * 32}
    model, optimizer, scheduler = _run()
    checkpoints.save(spec.job_dir, 40, model, optimizer, scheduler, {}, run=other)
    reason = checkpoints.mismatch(spec.job_dir, own)
    assert reason is not None and "step-00000040" in reason and "job_id, dataset_sha256" in reason
    events: list[tuple[str, dict[str, Any]]] = []
    hooks = SimpleNamespace(on_event=lambda type, message, data: events.append((type, data)))
    assert recipe._resume(spec, hooks, *_run(), {}, None) == 0  # type: ignore[arg-type]
    assert events == [("resume_refused", {"reason": reason})]
    checkpoints.save(spec.job_dir, 2, model, optimizer, scheduler, {}, run=own)
    assert [p.name for p in checkpoints.complete(spec.job_dir)] == ["step-00000002"]
    assert checkpoints.mismatch(spec.job_dir, own) is None
    assert recipe._resume(spec, hooks, *_run(), {}, None) == 2 and len(events) == 1  # type: ignore[arg-type]


def test_the_identity_is_the_run_not_how_its_steps_are_split(tmp_path: Path) -> None:
    """The memory fallback halves the micro-batch between attempts of the same steps: still the same run. Another
    learning rate is not; a checkpoint written before identities were recorded is resumed from as before."""
    spec, own = _identity(tmp_path)
    split = checkpoints.identity(
        replace(spec, hp=spec.hp.model_copy(update={"micro_batch_size": 1, "gradient_accumulation_steps": 4}))
    )
    assert split == own
    model, optimizer, scheduler = _run()
    checkpoints.save(spec.job_dir, 3, model, optimizer, scheduler, {}, run=own)
    _, faster = _identity(tmp_path, learning_rate=0.1)
    assert "hyperparameters.learning_rate" in (checkpoints.mismatch(spec.job_dir, faster) or "")
    legacy = tmp_path / "legacy"
    checkpoints.save(legacy, 3, model, optimizer, scheduler, {})
    assert checkpoints.mismatch(legacy, own) is None and checkpoints.restore(legacy, *_run(), {}) == 3
