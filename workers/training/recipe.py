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
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from service.core.training_info import FILENAME as TRAINING_INFO
from service.datasets.tokens import describe as describe_token_stats
from service.datasets.tokens import token_stats
from service.jobs.models import Progress, ResolvedHyperparameters
from service.llm.modeling import LoadPlan, load_model, load_tokenizer, pick_device, plan_load
from service.llm.prompts import Example
from workers.training import artifacts, checkpoints
from workers.training.distributed import SINGLE, Distributed
from workers.training.evaluation import evaluate
from workers.training.packing import PackedBatch
from workers.training.steps import epoch_order, max_step_tokens
from workers.training.token_cache import tokenize_cached

if TYPE_CHECKING:
    from workers.training.cuda.plan import CudaPlan


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
    token_cache_dir: Path | None = None  # tokenised rows cached per dataset and tokenizer
    # (workers.training.token_cache)
    gpu_memory_gib: float | None = None  # CUDA: memory the job may use (FLASHTUNE_GPU_MEMORY_GIB); None: all free
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
def tokenize(
    examples: list[Example], tokenizer: Any, max_length: int, cache_dir: Path | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, cut to ``max_length``; labels are -100 over the prompt."""
    return truncate(tokenize_cached(examples, tokenizer, cache_dir), max_length)


def truncate(rows: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    return [(ids[:max_length], labels[:max_length]) for ids, labels in rows]


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
    from peft import LoraConfig, get_peft_model

    # No prepare_model_for_kbit_training on the NF4 base: its fp32 copies of norms, embeddings and head and its
    # unconditional gradient checkpointing cost ~3x the speed (docs/benchmarks.md); bf16 autocast is enough, and
    # workers.training.cuda.plan turns checkpointing on only when memory requires it.
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
def eval_loss(
    model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, device: str, size: int, cuda: Any = None
) -> float | None:
    if not rows:
        return None
    model.eval()
    total, tokens = 0.0, 0
    batches = (
        cuda.pack(rows, pad_id)
        if cuda is not None
        else [collate(rows[i : i + size], pad_id) for i in range(0, len(rows), size)]
    )
    for batch in batches:
        loss = cuda.loss(model, batch, 1) if cuda is not None else step_loss(model, batch, device, 1)
        total += float(loss)
        tokens += batch.num_target_tokens
    model.train()
    return total / max(tokens, 1)


def _plan_cuda(
    model: Any,
    row_lengths: list[int],
    hp: ResolvedHyperparameters,
    pad_id: int,
    dist: Distributed,
    gpu_memory_gib: float | None,
) -> CudaPlan:
    """The CUDA plan for this rank's packed micro-batches: at most one step's share of tokens, or the recipe's
    micro-batch of full-length rows, whichever is less."""
    from workers.training.cuda.plan import plan_cuda

    step_tokens = max_step_tokens(row_lengths, hp.batch_size, hp.epochs, hp.seed, dist.shard)
    micro_tokens = min(step_tokens, hp.micro_batch_size * hp.max_length)
    return plan_cuda(model, micro_tokens, hp.max_length, pad_id, hp.batch_size, gpu_memory_gib)


def _optimizer(
    trainable: list[torch.Tensor], hp: ResolvedHyperparameters, total_steps: int, fused: bool
) -> tuple[Any, Any]:
    """AdamW (fused on CUDA) and the linear schedule with warm-up."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=0.0, fused=fused)
    warmup = math.ceil(hp.warmup_ratio * total_steps)
    return optimizer, get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ------------------------------------------------------------------------------------------------------- train
def train(spec: TrainingSpec, hooks: Hooks, dist: Distributed = SINGLE) -> dict[str, Any]:
    """Run the job to completion and publish the adapter; returns the training_info written beside it.

    ``dist``: this process's rank in a multi-GPU job (workers/training/distributed.py): each rank trains its share of
    every
    step's samples; rank 0 alone checkpoints, evaluates and publishes (the other ranks return ``{}``).
    """
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
    load_seconds = time.monotonic() - started
    full_rows = tokenize_cached(spec.train + spec.validation, tokenizer, spec.token_cache_dir)
    lengths = token_stats([len(ids) for ids, _ in full_rows], hp.max_length)
    hooks.on_event("dataset", describe_token_stats(lengths), {"token_stats": lengths})
    cut = truncate(full_rows, hp.max_length)
    train_rows, val_rows = cut[: len(spec.train)], cut[len(spec.train) :]
    train_lengths = [len(ids) for ids, _ in train_rows]  # steps are balanced by tokens (workers/training/steps.py)
    pad_id = tokenizer.pad_token_id
    cuda = None
    if device == "cuda":  # padding-free packed rows, sized to the free memory (workers/training/cuda/plan.py)
        cuda = _plan_cuda(model, train_lengths, hp, pad_id, dist, spec.gpu_memory_gib)
        hooks.on_event("cuda_plan", cuda.describe(), cuda.summary())

    steps_per_epoch = math.ceil(len(train_rows) / hp.batch_size)
    total_steps = steps_per_epoch * hp.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    # CUDA graphs reuse their gradient buffers: autograd must add into gradients it does not own (cuda_graphs.py)
    keep_grads = cuda is not None and cuda.graphed is not None
    if keep_grads:
        for p in trainable:
            p.grad = torch.zeros_like(p)
    optimizer, scheduler = _optimizer(trainable, hp, total_steps, fused=device == "cuda")
    history: dict[str, list[Any]] = {"step_loss": [], "epoch_loss": [], "eval_loss": []}
    start_step = checkpoints.restore(spec.job_dir, model, optimizer, scheduler, history)
    dist.sync_start(trainable, hp.seed, start_step)  # multi-GPU: every rank starts from rank 0's weights
    if start_step:
        hooks.on_event("resumed", f"resumed from checkpoint at step {start_step}", {"step": start_step})
    setup_seconds = time.monotonic() - started

    # The loop: one optimizer step per iteration, micro-batches accumulated inside it.
    def micro_batches(step: int) -> list[Batch] | list[PackedBatch]:
        """This rank's share of the step's samples, as packed rows (CUDA) or padded micro-batches."""
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(train_lengths, hp.batch_size, hp.seed, epoch)
        chosen = [train_rows[i] for i in order[index_in_epoch * hp.batch_size : (index_in_epoch + 1) * hp.batch_size]]
        chosen = dist.shard(chosen)
        if cuda is not None:
            return cuda.pack(chosen, pad_id)
        size = hp.micro_batch_size
        return [collate(chosen[i : i + size], pad_id) for i in range(0, len(chosen), size)]

    model.train()
    loop_start, tokens_seen = time.monotonic(), 0
    epoch_losses: list[float] = []
    next_micro = micro_batches(start_step) if start_step < total_steps else []
    for step in range(start_step, total_steps):
        epoch = step // steps_per_epoch
        micro = next_micro
        denominator = dist.sum_int(sum(b.num_target_tokens for b in micro))  # the step's target tokens, all ranks
        step_loss_sum, step_tokens = torch.zeros((), device=device), 0
        for batch in micro:
            if isinstance(batch, PackedBatch):
                assert cuda is not None
                loss, tokens = cuda.loss(model, batch, denominator), batch.num_real_tokens
            else:
                loss, tokens = step_loss(model, batch, device, denominator), batch.num_tokens
            loss.backward()
            step_loss_sum += loss.detach()  # a tensor: reading it per micro-batch would stall the GPU each time
            step_tokens += tokens
        step_loss_sum, step_tokens = dist.reduce_step(trainable, step_loss_sum, step_tokens)  # summed over ranks
        tokens_seen += step_tokens
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        next_micro = micro_batches(step + 1) if step + 1 < total_steps else []  # while the GPU finishes this step
        loss_value = float(step_loss_sum)  # the step's one wait for the GPU, once all its work is queued

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
            val = eval_loss(model, val_rows, pad_id, device, hp.micro_batch_size, cuda)
            history["eval_loss"].append([done, None if val is None else round(val, 5)])
            hooks.on_event(
                "epoch",
                f"epoch {epoch + 1}/{hp.epochs} done: loss {mean:.4f}, eval loss {val}",
                {"epoch": epoch + 1, "loss": mean, "eval_loss": val, "step": done},
            )
            epoch_losses = []
        hooks.on_progress(progress, epoch_end)
        stop = hooks.should_stop()
        if stop and not epoch_end:
            hooks.on_progress(progress, True)  # not throttled: a requeued job shows the step it checkpointed
        if dist.is_main and done < total_steps and (epoch_end or done % spec.checkpoint_every == 0 or stop):
            checkpoints.save(spec.job_dir, done, model, optimizer, scheduler, history)
            hooks.on_event("checkpoint", f"checkpoint at step {done}", {"step": done})
        if stop:
            raise Interrupted(f"stopped at step {done}")
    train_seconds = time.monotonic() - loop_start
    if not dist.is_main:
        return {}

    # Evaluate base vs adapter on the held-out split, then publish.
    model.eval()
    evaluation_start = time.monotonic()
    metrics = evaluate(model, tokenizer, spec.validation)
    hooks.on_event("evaluation", _evaluation_message(metrics), metrics)
    durations = {
        "load_seconds": load_seconds,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "evaluate_seconds": time.monotonic() - evaluation_start,
        "total_seconds": time.monotonic() - started,
    }
    info = _training_info(
        spec,
        plan,
        cuda,
        history,
        metrics,
        durations,
        num_train=len(train_rows),
        num_validation=len(val_rows),
        total_steps=total_steps,
        start_step=start_step,
    )
    publish_adapter(model, tokenizer, info, spec.adapter_dir)
    checkpoints.prune(spec.job_dir, keep=0)
    return info


def _training_info(
    spec: TrainingSpec,
    plan: LoadPlan,
    cuda: CudaPlan | None,
    history: dict[str, list[Any]],
    metrics: dict[str, Any],
    durations: dict[str, float],
    *,
    num_train: int,
    num_validation: int,
    total_steps: int,
    start_step: int,
) -> dict[str, Any]:
    """The record published beside the adapter (training_info.json): where it came from, how it trained, how well."""
    info = {
        "job_id": spec.job_id,
        "base_model": spec.base_model,
        "base_model_source": spec.base_source,
        "dataset": spec.dataset,
        "dataset_sha256": spec.dataset_sha256,
        "hyperparameters": spec.hp.model_dump(),
        "device": plan.device,
        "quantization": plan.quantization,
        "load_reason": plan.reason,
        "num_train": num_train,
        "num_validation": num_validation,
        "total_steps": total_steps,
        "resumed_from_step": start_step,
        "losses": history,
        "metrics": metrics,
        "durations": {name: round(seconds, 2) for name, seconds in durations.items()},
        "versions": _versions(),
        **spec.extra_info,
    }
    if cuda is not None:
        info["cuda_plan"] = cuda.summary()
        info["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
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
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str))
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
