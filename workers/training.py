"""One LoRA/QLoRA training run, top to bottom: setup -> train -> evaluate -> save.

This module knows nothing about the job queue: the worker's child process (``workers.child``) gives it a
``TrainingSpec`` and ``Hooks`` that report progress and say when to stop. It resumes from the newest complete
checkpoint in the job's folder, so a requeued job continues where it was interrupted.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.datasets.tokens import describe as describe_token_stats
from service.datasets.tokens import token_stats
from service.modeling import LoadPlan, load_model, load_tokenizer, pick_device, plan_load
from service.models import Progress, ResolvedHyperparameters
from service.prompts import Example, render_prompt
from workers import artifacts, checkpoints
from workers.evaluation import evaluate
from workers.packing import PackedBatch, pack_by_tokens, packed_loss, use_packing


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint; the job can resume from it."""


class TrainingError(Exception):
    """A final failure caused by the job's input; ``hint`` says what to change."""

    def __init__(self, message: str, hint: str | None = None, type: str = "training_error") -> None:
        super().__init__(message)
        self.hint = hint
        self.type = type


@dataclass
class Hooks:
    on_progress: Callable[[Progress, bool], None] = lambda progress, force: None
    on_event: Callable[[str, str, dict[str, Any]], None] = lambda type, message, data: None
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class TrainingSpec:
    job_id: int
    base_model: str  # the name the user gave
    base_source: str  # what from_pretrained gets
    dataset: str
    dataset_sha256: str | None
    train: list[Example]
    validation: list[Example]
    hp: ResolvedHyperparameters
    job_dir: Path
    adapter_dir: Path
    device: str = "auto"
    checkpoint_every: int = 50
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != -100).sum())


# ------------------------------------------------------------------------------------------------------ setup
def tokenize(examples: list[Example], tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; labels are -100 over the prompt so the loss covers the response only."""
    rows = []
    for example in examples:
        prompt = render_prompt(example.input, example.instruction)
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + example.output)["input_ids"] + [tokenizer.eos_token_id]
        boundary = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(prompt_ids))
        labels = [-100] * boundary + ids[boundary:]
        rows.append((ids[:max_length], labels[:max_length]))
    return rows


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return Batch(input_ids, attention, labels)


def attach_lora(model: Any, hp: ResolvedHyperparameters, plan: LoadPlan) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if plan.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=hp.lora_dropout,
        target_modules=hp.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TrainingError(
            f"LoRA could not be attached: {exc}",
            hint=f"set hyperparameters.target_modules to linear layers of this model, e.g. {names[:10]}",
            type="invalid_hyperparameters",
        ) from exc


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of an epoch; derived from (seed, epoch) so a resumed run sees the same order."""
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_loss(model: Any, batch: Batch, device: str, denominator: int) -> torch.Tensor:
    """Summed response-token cross-entropy of a micro-batch, divided by the optimizer step's target tokens."""
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch.labels[:, 1:].to(device)
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / max(denominator, 1)


@torch.no_grad()
def eval_loss(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, device: str, size: int) -> float | None:
    if not rows:
        return None
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(rows), size):
        batch = collate(rows[i : i + size], pad_id)
        total += float(step_loss(model, batch, device, 1))
        tokens += batch.num_target_tokens
    model.train()
    return total / max(tokens, 1)


# ------------------------------------------------------------------------------------------------------- train
def train(spec: TrainingSpec, hooks: Hooks) -> dict[str, Any]:
    """Run the job to completion and publish the adapter; returns the training_info written beside it."""
    hp = spec.hp
    started = time.monotonic()
    device = pick_device(spec.device)
    plan = plan_load(device, hp.quantization)
    hooks.on_event("setup", f"{plan.reason}", {"device": plan.device, "quantization": plan.quantization})
    if not spec.train:
        raise TrainingError("the dataset has no training examples", hint="upload a dataset with examples")

    torch.manual_seed(hp.seed)
    tokenizer = load_tokenizer(spec.base_source)
    model = attach_lora(load_model(spec.base_source, plan), hp, plan)
    train_rows = tokenize(spec.train, tokenizer, hp.max_length)
    val_rows = tokenize(spec.validation, tokenizer, hp.max_length)
    lengths = token_stats(spec.train + spec.validation, tokenizer, hp.max_length)
    hooks.on_event("dataset", describe_token_stats(lengths), {"token_stats": lengths})
    pad_id = tokenizer.pad_token_id

    steps_per_epoch = math.ceil(len(train_rows) / hp.batch_size)
    total_steps = steps_per_epoch * hp.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=0.0, fused=device == "cuda")
    from transformers import get_scheduler

    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=math.ceil(hp.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    history: dict[str, list[Any]] = {"step_loss": [], "epoch_loss": [], "eval_loss": []}
    start_step = checkpoints.restore(spec.job_dir, model, optimizer, scheduler, history)
    if start_step:
        hooks.on_event("resumed", f"resumed from checkpoint at step {start_step}", {"step": start_step})
    setup_seconds = time.monotonic() - started

    # The loop: one optimizer step per iteration, micro-batches accumulated inside it.
    model.train()
    packed = use_packing(device)
    loop_start, tokens_seen = time.monotonic(), 0
    epoch_losses: list[float] = []
    for step in range(start_step, total_steps):
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(train_rows), hp.seed, epoch)
        chosen = [train_rows[i] for i in order[index_in_epoch * hp.batch_size : (index_in_epoch + 1) * hp.batch_size]]
        micro: list[Batch] | list[PackedBatch]
        if packed:  # CUDA: padding-free rows within the padded micro-batch's token budget (workers/packing.py)
            micro = pack_by_tokens(chosen, hp.micro_batch_size * hp.max_length, pad_to_multiple=256, pad_id=pad_id)
        else:
            micro = [
                collate(chosen[i : i + hp.micro_batch_size], pad_id) for i in range(0, len(chosen), hp.micro_batch_size)
            ]
        denominator = sum(b.num_target_tokens for b in micro)
        loss_value = 0.0
        for batch in micro:
            if isinstance(batch, PackedBatch):
                loss, tokens = packed_loss(model, batch, device, denominator), batch.num_real_tokens
            else:
                loss, tokens = step_loss(model, batch, device, denominator), batch.num_tokens
            loss.backward()
            loss_value += float(loss.detach())
            tokens_seen += tokens
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        history["step_loss"].append([done, round(loss_value, 5)])
        epoch_losses.append(loss_value)
        elapsed = time.monotonic() - loop_start
        rate = (done - start_step) / elapsed if elapsed > 0 else 0.0
        epoch_end = done % steps_per_epoch == 0
        progress = Progress(
            step=done,
            total_steps=total_steps,
            epoch=round(done / steps_per_epoch, 4),
            total_epochs=hp.epochs,
            loss=round(loss_value, 5),
            learning_rate=scheduler.get_last_lr()[0],
            tokens_per_second=round(tokens_seen / elapsed, 1) if elapsed > 0 else None,
            eta_seconds=round((total_steps - done) / rate, 1) if rate > 0 else None,
            fraction=round(done / total_steps, 4),
        )
        if epoch_end:
            mean = sum(epoch_losses) / len(epoch_losses)
            history["epoch_loss"].append([epoch + 1, round(mean, 5)])
            val = eval_loss(model, val_rows, pad_id, device, hp.micro_batch_size)
            history["eval_loss"].append([done, None if val is None else round(val, 5)])
            hooks.on_event(
                "epoch", f"epoch {epoch + 1}/{hp.epochs} done: loss {mean:.4f}, eval loss {val}",
                {"epoch": epoch + 1, "loss": mean, "eval_loss": val, "step": done},
            )  # fmt: skip
            epoch_losses = []
        hooks.on_progress(progress, epoch_end)
        stop = hooks.should_stop()
        if stop and not epoch_end:
            hooks.on_progress(progress, True)  # not throttled: a requeued job shows the step it checkpointed
        if done < total_steps and (epoch_end or done % spec.checkpoint_every == 0 or stop):
            checkpoints.save(spec.job_dir, done, model, optimizer, scheduler, history)
            hooks.on_event("checkpoint", f"checkpoint at step {done}", {"step": done})
        if stop:
            raise Interrupted(f"stopped at step {done}")
    train_seconds = time.monotonic() - loop_start

    # Evaluate base vs adapter on the held-out split, then publish.
    model.eval()
    metrics = evaluate(model, tokenizer, spec.validation)
    hooks.on_event("evaluation", _evaluation_message(metrics), metrics)
    info = {
        "job_id": spec.job_id,
        "base_model": spec.base_model,
        "base_model_source": spec.base_source,
        "dataset": spec.dataset,
        "dataset_sha256": spec.dataset_sha256,
        "hyperparameters": hp.model_dump(),
        "device": plan.device,
        "quantization": plan.quantization,
        "load_reason": plan.reason,
        "num_train": len(train_rows),
        "num_validation": len(val_rows),
        "total_steps": total_steps,
        "resumed_from_step": start_step,
        "losses": history,
        "metrics": metrics,
        "durations": {
            "setup_seconds": round(setup_seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(time.monotonic() - started, 2),
        },
        "versions": _versions(),
        **spec.extra_info,
    }
    publish_adapter(model, tokenizer, info, spec.adapter_dir)
    checkpoints.prune(spec.job_dir, keep=0)
    return info


def _evaluation_message(metrics: dict[str, Any]) -> str:
    base, adapter = metrics.get("base", {}), metrics.get("adapter", {})
    if "accuracy" not in adapter:
        return "evaluation: no labelled validation examples"
    return (
        f"held-out accuracy: base {base.get('accuracy', 0):.3f} -> adapter {adapter['accuracy']:.3f}; "
        f"macro-F1 {base.get('macro_f1', 0):.3f} -> {adapter['macro_f1']:.3f}"
    )


def publish_adapter(model: Any, tokenizer: Any, info: dict[str, Any], adapter_dir: Path) -> None:
    """Write the adapter into a temporary folder beside its final place, then rename it there atomically."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}-", dir=adapter_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str))
        artifacts.write_all(tmp, info["losses"])
        os.chmod(tmp, 0o755)
        if adapter_dir.exists():  # a retried job whose previous attempt published: replace it
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
