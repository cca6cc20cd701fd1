"""One LoRA/QLoRA training run, read top to bottom: ``train() = setup() -> fit() -> finish()``.

- ``setup`` loads the base and attaches LoRA, tokenises the examples, plans the CUDA path, builds the optimizer and
  resumes from the newest complete checkpoint in the job's folder (a requeued job continues where it stopped);
- ``fit`` runs the optimizer steps, one ``optimizer_step`` each, reporting after every step and checkpointing
  (every ``checkpoint_every`` steps, at each epoch's end, when stopped, and after the last step, so that an attempt
  that dies in ``finish`` leaves its successor only the evaluation and the publishing to do);
- ``finish`` evaluates base against adapter on the held-out split and publishes the adapter with its
  ``training_info.json``. The checkpoints stay: the worker removes them once it has recorded the job's success
  (``workers.worker``), so that a takeover before that resumes from them.

This module knows nothing about the job queue: the worker's child process (``workers.child``) gives it a
``TrainingSpec`` and ``Hooks`` (``workers.training.spec``) that report progress and say when to stop.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from service.core.training_info import FILENAME as TRAINING_INFO
from service.datasets.tokens import describe as describe_token_stats
from service.datasets.tokens import token_stats
from service.jobs.hyperparameters import ResolvedHyperparameters
from service.jobs.models import Progress
from service.llm.modeling import (
    LoadPlan,
    cuda_capability,
    load_tokenizer,
    name_base_publicly,
    pick_device,
    plan_load,
    public_base_name,
)
from workers.training import artifacts, checkpoints, incumbent, warm_base
from workers.training.batches import Batch, StepBatches, collate_all, truncate
from workers.training.distributed import SINGLE, Distributed
from workers.training.evaluation import evaluate
from workers.training.packing import PackedBatch
from workers.training.spec import Fence, Hooks, Interrupted, TrainingError, TrainingSpec, no_fence
from workers.training.token_cache import Row, tokenize_cached

if TYPE_CHECKING:
    from workers.training.cuda.plan import CudaPlan


def train(spec: TrainingSpec, hooks: Hooks, dist: Distributed = SINGLE) -> dict[str, Any]:
    """Run the job to completion and publish the adapter; returns the training_info written beside it.

    ``dist``: this process's rank in a multi-GPU job (workers/training/distributed.py): each rank trains its share
    of every step's samples; rank 0 alone checkpoints, evaluates and publishes (the other ranks return ``{}``).
    """
    run = setup(spec, hooks, dist)
    saving = warm_base.start_saving(run.base_copy, spec.base_cache, hooks)  # written while training (warm_base)
    run.base_copy = None
    try:
        fit(run)
        info = finish(run) if dist.is_main else {}
        warm_base.keep(saving, spec.base_cache, hooks)  # after publishing: the adapter is out before this waits
        return info
    finally:
        if saving is not None:
            saving.abandon()  # stopped early: the unfinished copy goes (after keep: nothing left to do)


@dataclass
class Run:
    """One run's state: what ``setup`` built, ``fit`` advances and ``finish`` publishes."""

    spec: TrainingSpec
    hooks: Hooks
    dist: Distributed
    plan: LoadPlan
    tokenizer: Any
    model: Any
    batches: StepBatches  # the training rows, step by step
    val_rows: list[Row]
    cuda: CudaPlan | None  # None off CUDA
    trainable: list[torch.Tensor]
    optimizer: Any
    scheduler: Any
    history: dict[str, list[Any]]  # step, epoch and eval losses (restored with a checkpoint)
    start_step: int  # 0, or the checkpoint's step when resumed
    started: float  # time.monotonic() when setup began
    durations: dict[str, float] = field(default_factory=dict)  # load, setup, train seconds so far
    skipped_steps: int = 0  # fp16: optimizer steps skipped because the scaled gradients overflowed, every attempt
    base_copy: warm_base.BaseCopy | None = None  # a base quantised on load, for the base cache (train saves it)

    @property
    def device(self) -> str:
        return self.plan.device

    @property
    def scaler(self) -> Any:
        """fp16 (pre-Ampere cards): the dynamic loss scaler of the CUDA plan; None otherwise."""
        return None if self.cuda is None else self.cuda.scaler

    @property
    def total_steps(self) -> int:
        return self.batches.steps_per_epoch * self.spec.hp.epochs

    @property
    def keeps_grads(self) -> bool:
        """CUDA graphs reuse their gradient buffers: autograd must add into gradients it does not own
        (workers/training/cuda/graphs.py), so they are zeroed, never freed."""
        return self.cuda is not None and self.cuda.graphed is not None


# ------------------------------------------------------------------------------------------------------ setup
def setup(spec: TrainingSpec, hooks: Hooks, dist: Distributed = SINGLE) -> Run:
    """Load, tokenise, plan and resume: everything before the first optimizer step."""
    started = time.monotonic()
    plan, tokenizer, model, base_copy = _load(spec, hooks, save=dist.is_main)
    load_seconds = time.monotonic() - started
    batches, val_rows = tokenized(spec, tokenizer, hooks, dist)
    cuda = None
    if plan.device == "cuda":  # padding-free packed rows, sized to the free memory (workers/training/cuda/plan.py)
        cuda = _plan_cuda(model, batches, spec, plan.dtype)
        hooks.on_event("cuda_plan", cuda.describe(), cuda.summary())
        for note in cuda.fallbacks:
            hooks.on_event("fallback", note, {"fallback": note})
        batches = batches.packed_by(cuda.pack)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cuda is not None and cuda.graphed is not None:  # see Run.keeps_grads
        for p in trainable:
            p.grad = torch.zeros_like(p)
    total_steps = batches.steps_per_epoch * spec.hp.epochs
    optimizer, scheduler = _optimizer(trainable, spec.hp, total_steps, fused=plan.device == "cuda")
    history: dict[str, list[Any]] = {"step_loss": [], "epoch_loss": [], "eval_loss": []}
    scaler = None if cuda is None else cuda.scaler  # fp16: the loss scale resumes where the checkpoint left it
    start_step = _resume(spec, hooks, model, optimizer, scheduler, history, scaler)
    dist.sync_start(trainable, spec.hp.seed, start_step)  # multi-GPU: every rank starts from rank 0's weights
    if start_step:
        done = " (training is done: on to the evaluation)" if start_step >= total_steps else ""
        hooks.on_event("resumed", f"resumed from checkpoint at step {start_step}{done}", {"step": start_step})
    return Run(
        spec=spec,
        hooks=hooks,
        dist=dist,
        plan=plan,
        tokenizer=tokenizer,
        model=model,
        batches=batches,
        val_rows=val_rows,
        cuda=cuda,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        history=history,
        start_step=start_step,
        started=started,
        durations={"load_seconds": load_seconds, "setup_seconds": time.monotonic() - started},
        skipped_steps=int((history.get("skipped_steps") or [0])[0]),  # by earlier attempts too
        base_copy=base_copy,
    )


def _resume(
    spec: TrainingSpec, hooks: Hooks, model: Any, optimizer: Any, scheduler: Any, history: dict[str, Any], scaler: Any
) -> int:
    """The step to start from: the newest complete checkpoint's, restored, if it is this run's
    (``checkpoints.mismatch``); else 0, with a ``resume_refused`` event that says why (the run's first checkpoint
    removes the other run's). Every rank reads the same files and decides alike."""
    refused = checkpoints.mismatch(spec.job_dir, checkpoints.identity(spec))
    if refused is None:
        return checkpoints.restore(spec.job_dir, model, optimizer, scheduler, history, scaler)
    hooks.on_event("resume_refused", f"not resumed: {refused}; training from step 0", {"reason": refused})
    return 0


def _load(spec: TrainingSpec, hooks: Hooks, save: bool = True) -> tuple[LoadPlan, Any, Any, warm_base.BaseCopy | None]:
    """The load plan, the tokenizer, the base with LoRA attached (seeded: LoRA's initial weights are the seed's,
    whether the base came from the base cache or not) and, when it was quantised on load, its copy for the cache."""
    plan = plan_load(pick_device(spec.device), spec.hp.quantization, spec.compute_dtype, spec.cuda_capability)
    data = {"device": plan.device, "quantization": plan.quantization, "compute_dtype": plan.dtype_name}
    hooks.on_event("setup", f"{plan.reason}", data)
    if not spec.train:
        raise TrainingError("the dataset has no training examples", hint="upload a dataset with examples")
    torch.manual_seed(spec.hp.seed)
    tokenizer = load_tokenizer(spec.base_source)
    if spec.hp.prompt_format == "chat_template" and getattr(tokenizer, "chat_template", None) is None:
        raise TrainingError(
            "prompt_format 'chat_template' needs a base model whose tokenizer has a chat template; this one has none",
            hint="use prompt_format 'flashtune' (the default) or a chat model",
            type="invalid_hyperparameters",
        )
    base, base_copy = warm_base.load_base(spec, plan, hooks, save)
    torch.manual_seed(spec.hp.seed)
    return plan, tokenizer, attach_lora(base, spec.hp, plan), base_copy


def tokenized(spec: TrainingSpec, tokenizer: Any, hooks: Hooks, dist: Distributed) -> tuple[StepBatches, list[Row]]:
    """The training rows as steps (this rank's share of each) and the validation rows, cut to ``max_length``;
    reports the dataset's token lengths before the cut."""
    hp = spec.hp
    full_rows = tokenize_cached(spec.train + spec.validation, tokenizer, spec.token_cache_dir, hp.prompt_format)
    lengths = token_stats([len(ids) for ids, _ in full_rows], hp.max_length)
    hooks.on_event("dataset", describe_token_stats(lengths), {"token_stats": lengths})
    cut = truncate(full_rows, hp.max_length)
    train_rows, val_rows = cut[: len(spec.train)], cut[len(spec.train) :]
    batches = StepBatches(
        train_rows,
        batch_size=hp.batch_size,
        micro_batch_size=hp.micro_batch_size,
        seed=hp.seed,
        pad_id=tokenizer.pad_token_id,
        shard=dist.shard,
        balanced=hp.step_order == "balanced",  # steps are balanced by tokens (workers/training/steps.py)
    )
    return batches, val_rows


def attach_lora(model: Any, hp: ResolvedHyperparameters, plan: LoadPlan) -> Any:
    from peft import LoraConfig, get_peft_model

    # No prepare_model_for_kbit_training on the NF4 base: its fp32 copies of norms, embeddings and head and its
    # unconditional gradient checkpointing cost ~3x the speed (docs/benchmarks.md); autocast is enough, and
    # workers.training.cuda.plan turns checkpointing on only when memory requires it.
    config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=hp.lora_dropout,
        target_modules=hp.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TrainingError(
            f"LoRA could not be attached: {exc}",
            hint=f"set hyperparameters.target_modules to linear layers of this model, e.g. {names[:10]}",
            type="invalid_hyperparameters",
        ) from exc
    for param in model.parameters():  # peft keeps LoRA weights in float32; loss scaling (fp16) relies on it
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _plan_cuda(model: Any, batches: StepBatches, spec: TrainingSpec, dtype: torch.dtype) -> CudaPlan:
    """The CUDA plan for this rank's packed micro-batches: at most one step's share of tokens, or the recipe's
    micro-batch of full-length rows, whichever is less."""
    from workers.training.cuda.plan import Compute, plan_cuda

    hp = spec.hp
    micro_tokens = min(batches.max_step_tokens(hp.epochs), hp.micro_batch_size * hp.max_length)
    compute = Compute(dtype, cuda_capability(spec.cuda_capability))
    longest = max(batches.lengths, default=hp.max_length)  # the rows are cut to max_length already (tokenized)
    return plan_cuda(
        model,
        micro_tokens,
        hp.max_length,
        batches.pad_id,
        hp.batch_size,
        spec.gpu_memory_gib,
        spec.cuda,
        compute,
        longest,
    )


def _optimizer(
    trainable: list[torch.Tensor], hp: ResolvedHyperparameters, total_steps: int, fused: bool
) -> tuple[Any, Any]:
    """AdamW (fused on CUDA) and the linear schedule with warm-up."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=0.0, fused=fused)
    warmup = math.ceil(hp.warmup_ratio * total_steps)
    return optimizer, get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# -------------------------------------------------------------------------------------------------------- fit
@dataclass
class Pace:
    """The loop's own counters: its start, the tokens trained since, this epoch's step losses."""

    started: float = field(default_factory=time.monotonic)
    tokens_seen: int = 0
    tokens_before: int = 0  # trained by earlier attempts (restored with the checkpoint's history)
    epoch_losses: list[float] = field(default_factory=list)


def fit(run: Run) -> None:
    """The optimizer steps from ``run.start_step`` to the end: each step's micro-batches are prepared while the GPU
    finishes the step before, and the step's loss is read once all its work is queued (its one wait for the GPU).
    Adds ``train_seconds`` to ``run.durations``; raises ``Interrupted`` after checkpointing when asked to stop."""
    run.model.train()
    pace = Pace(tokens_before=int((run.history.get("trained_tokens") or [0])[0]))
    micro = run.batches(run.start_step) if run.start_step < run.total_steps else []
    for step in range(run.start_step, run.total_steps):
        loss, tokens, overflowed = optimizer_step(run, micro)
        pace.tokens_seen += tokens
        run.history["trained_tokens"] = [pace.tokens_before + pace.tokens_seen]
        micro = run.batches(step + 1) if step + 1 < run.total_steps else []  # while the GPU finishes this step
        after_step(run, pace, step + 1, float(loss), overflowed is not None and bool(overflowed))
    run.durations["train_seconds"] = time.monotonic() - pace.started


def optimizer_step(run: Run, micro: list[Batch] | list[PackedBatch]) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """One optimizer step over this rank's micro-batches (gradients accumulated, then summed over ranks): the step's
    loss, a tensor not yet read, its tokens, all ranks together, and (fp16, loss scaling) whether its gradients
    overflowed, also a tensor not yet read: that step was skipped (``GradScaler``). The scheduler steps in
    ``after_step``, once that is known."""
    denominator = run.dist.sum_int(sum(b.num_target_tokens for b in micro))  # the step's target tokens, all ranks
    loss_sum, tokens, scaler = torch.zeros((), device=run.device), 0, run.scaler
    for batch in micro:
        if isinstance(batch, PackedBatch):
            assert run.cuda is not None
            loss, batch_tokens = run.cuda.loss(run.model, batch, denominator), batch.num_real_tokens
        else:
            loss, batch_tokens = step_loss(run.model, batch, run.device, denominator), batch.num_tokens
        (loss if scaler is None else scaler.scale(loss)).backward()
        loss_sum += loss.detach()  # a tensor: reading it per micro-batch would stall the GPU each time
        tokens += batch_tokens
    loss_sum, tokens = run.dist.reduce_step(run.trainable, loss_sum, tokens)  # summed over ranks
    overflowed = None
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(run.trainable, 1.0)
        run.optimizer.step()
    else:  # every rank holds the same summed gradients, so every rank skips the same steps
        scaler.unscale_(run.optimizer)
        overflowed = ~torch.isfinite(torch.nn.utils.clip_grad_norm_(run.trainable, 1.0))
        scaler.step(run.optimizer)  # skipped where the gradients hold inf or NaN
        scaler.update()
    run.optimizer.zero_grad(set_to_none=not run.keeps_grads)
    return loss_sum, tokens, overflowed


def after_step(run: Run, pace: Pace, done: int, loss: float, skipped: bool = False) -> None:
    """Record and report step ``done`` (``skipped``: its fp16 gradients overflowed, the weights and the learning-rate
    schedule stay where they were); at an epoch's end the validation loss; checkpoint when due, when stopping and
    after the last step (an attempt that dies while evaluating or publishing leaves the next one nothing to train)."""
    if skipped:
        _report_skipped(run, done)
    else:
        run.scheduler.step()
    run.history["step_loss"].append([done, round(loss, 5)])
    pace.epoch_losses.append(loss)
    progress = _progress(run, pace, done, loss)
    epoch_end = done % run.batches.steps_per_epoch == 0
    if epoch_end:
        _end_epoch(run, pace, done)
    run.hooks.on_progress(progress, epoch_end)
    stop = run.hooks.should_stop()
    if stop and not epoch_end:
        run.hooks.on_progress(progress, True)  # not throttled: a requeued job shows the step it checkpointed
    due = epoch_end or done % run.spec.checkpoint_every == 0 or stop or done == run.total_steps
    if run.dist.is_main and due:
        spec, fence, scaler = run.spec, run.hooks.fence, run.scaler
        identity = checkpoints.identity(spec)
        checkpoints.save(
            spec.job_dir, done, run.model, run.optimizer, run.scheduler, run.history, fence, scaler, identity
        )
        run.hooks.on_event("checkpoint", f"checkpoint at step {done}", {"step": done})
    if stop:
        raise Interrupted(f"stopped at step {done}")


def _report_skipped(run: Run, done: int) -> None:
    """An event for an optimizer step that fp16 loss scaling skipped (its gradients overflowed)."""
    run.skipped_steps += 1
    run.history["skipped_steps"] = [run.skipped_steps]  # checkpointed with the history, as trained_tokens is
    scale = float(run.scaler.get_scale())
    run.hooks.on_event(
        "skipped_step",
        f"step {done} skipped: fp16 gradients overflowed; the loss scale is now {scale:g}",
        {"step": done, "loss_scale": scale, "skipped_steps": run.skipped_steps},
    )


def _progress(run: Run, pace: Pace, done: int, loss: float) -> Progress:
    elapsed = time.monotonic() - pace.started
    rate = (done - run.start_step) / elapsed if elapsed > 0 else 0.0
    total = run.total_steps
    return Progress(
        step=done,
        total_steps=total,
        epoch=round(done / run.batches.steps_per_epoch, 4),
        total_epochs=run.spec.hp.epochs,
        loss=round(loss, 5),
        learning_rate=run.scheduler.get_last_lr()[0],
        tokens_per_second=round(pace.tokens_seen / elapsed, 1) if elapsed > 0 else None,
        trained_tokens=pace.tokens_before + pace.tokens_seen,
        eta_seconds=round((total - done) / rate, 1) if rate > 0 else None,
        fraction=round(done / total, 4),
    )


def _end_epoch(run: Run, pace: Pace, done: int) -> None:
    """The epoch's mean step loss and the validation loss, into the history and the job's events."""
    epoch, epochs = done // run.batches.steps_per_epoch, run.spec.hp.epochs
    mean = sum(pace.epoch_losses) / len(pace.epoch_losses)
    run.history["epoch_loss"].append([epoch, round(mean, 5)])
    val = eval_loss(run.model, run.val_rows, run.batches.pad_id, run.device, run.spec.hp.micro_batch_size, run.cuda)
    run.history["eval_loss"].append([done, None if val is None else round(val, 5)])
    run.hooks.on_event(
        "epoch",
        f"epoch {epoch}/{epochs} done: loss {mean:.4f}, eval loss "
        + ("none (no held-out split)" if val is None else f"{val:.4f}"),
        {"epoch": epoch, "loss": mean, "eval_loss": val, "step": done},
    )
    pace.epoch_losses = []


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
    model: Any, rows: list[Row], pad_id: int, device: str, size: int, cuda: CudaPlan | None = None
) -> float | None:
    """Mean response-token loss over ``rows`` (None without rows), in eval mode; the model is left training."""
    if not rows:
        return None
    model.eval()
    total, tokens = 0.0, 0
    batches = cuda.pack(rows, pad_id) if cuda is not None else collate_all(rows, pad_id, size)
    for batch in batches:
        if isinstance(batch, PackedBatch):
            assert cuda is not None
            loss = cuda.loss(model, batch, 1)
        else:
            loss = step_loss(model, batch, device, 1)
        total += float(loss)
        tokens += batch.num_target_tokens
    model.train()
    return total / max(tokens, 1)


# ----------------------------------------------------------------------------------------------------- finish
def finish(run: Run) -> dict[str, Any]:
    """Evaluate base against adapter on the held-out split, then publish the adapter and its training_info."""
    if run.cuda is not None and run.cuda.graphed is not None:
        run.cuda.graphed.release()  # the evaluation needs the graphs' memory; no training pass is left
    run.model.eval()
    evaluation_start = time.monotonic()
    metrics = evaluate(run.model, run.tokenizer, run.spec.validation, run.spec.hp.prompt_format)
    if run.spec.compare_with is not None and metrics["num_labelled"]:  # a promotion's incumbent, on the same items
        metrics["incumbent"] = incumbent.compare(run.model, run.tokenizer, run.spec.validation, run.spec.compare_with)
    run.hooks.on_event("evaluation", _evaluation_message(metrics), metrics)
    durations = {
        **run.durations,
        "evaluate_seconds": time.monotonic() - evaluation_start,
        "total_seconds": time.monotonic() - run.started,
    }
    info = _training_info(run, metrics, durations)
    publish_adapter(run.model, run.tokenizer, info, run.spec.adapter_dir, run.hooks.fence)
    return info  # the checkpoints stay until the worker has recorded the success (see the module)


def _training_info(run: Run, metrics: dict[str, Any], durations: dict[str, float]) -> dict[str, Any]:
    """The record published beside the adapter (training_info.json): where it came from, how it trained, how well."""
    spec, plan = run.spec, run.plan
    info = {
        "job_id": spec.job_id,
        "base_model": public_base_name(spec.base_model),  # never a server path: the record leaves with the adapter
        "dataset": spec.dataset,
        "dataset_sha256": spec.dataset_sha256,
        "hyperparameters": spec.hp.model_dump(),
        "device": plan.device,
        "quantization": plan.quantization,
        "load_reason": plan.reason,
        "num_train": len(run.batches.rows),
        "num_validation": len(run.val_rows),
        "total_steps": run.total_steps,
        "resumed_from_step": run.start_step,
        "losses": run.history,
        "metrics": metrics,
        "durations": {name: round(seconds, 2) for name, seconds in durations.items()},
        "versions": _versions(),
        **spec.extra_info,
    }
    info["compute_dtype"] = plan.dtype_name
    if run.cuda is not None:
        info["cuda_plan"] = run.cuda.summary()
        if run.scaler is not None:
            info["skipped_steps"] = run.skipped_steps
            info["loss_scale"] = float(run.scaler.get_scale())
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


def publish_adapter(
    model: Any, tokenizer: Any, info: dict[str, Any], adapter_dir: Path, fence: Fence = no_fence
) -> None:
    """Write the adapter into a temporary folder beside its final place, then rename it there atomically, inside
    ``fence`` (``Hooks.fence``: only an attempt that still holds its job publishes). The temporary folders that
    earlier attempts of the job left there (killed while writing theirs) go at the same time."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{adapter_dir.name}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=adapter_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        name_base_publicly(tmp)  # the files leave with the adapter: the base's public name, not its path
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str))
        artifacts.write_all(tmp, info["losses"])
        os.chmod(tmp, 0o755)
        with fence("publish"):
            if adapter_dir.exists():  # a retried job whose previous attempt published: replace it
                shutil.rmtree(adapter_dir)
            os.replace(tmp, adapter_dir)
            for stale in adapter_dir.parent.iterdir():  # mkdtemp's names: the prefix and 8 characters
                if stale.name.startswith(prefix) and len(stale.name) == len(prefix) + 8:
                    shutil.rmtree(stale, ignore_errors=True)
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
