"""GPU training benchmark: the user's recipe through transformers Trainer vs FlashTune's loops, in one run.

Run on the H200 (see docs/benchmarks.md for the exact command):

    export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python bench/train_gpu.py --out $OUT

It builds a randomly initialised DeepSeek-LLM-7B-shaped LlamaForCausalLM on the GPU, saves it, and loads it
through FlashTune's own ``service.llm.modeling.load_model(plan_load("cuda", "auto"))`` (NF4, double quantisation, bf16
compute). The samples are random token ids with the lengths of the user's 300 seed instructions
(``bench/seed_lengths.json``: prompt and full length per sample, built-in tokenizer); prompt tokens carry no loss.

Variants, all on the same base and the same samples in the same (seed 42, epoch 0) order:
  packed*   FlashTune's CUDA path pieces: ``workers.training.packing`` rows, no padding, bf16 autocast, fused AdamW
  hf        the user's recipe through transformers Trainer (padded to 512, 4 x 4, grad checkpointing, paged 8-bit)
  worker*   the real ``workers.training.recipe.train`` on a ``TrainingSpec``, as the worker's child runs it; the
            variants turn pieces of the CUDA path off through the spec's ``CudaOptions`` (``WORKER_RUNS``)
  trl*, unsloth*  the peers on the worker's job (same samples, LoRA, batch, epochs, seed), each in a process of its
            own (``bench/train_peers.py``: how each is configured); ``peer_ratios`` sets ``worker`` against ``trl``
            and ``unsloth``, ``worker_r16`` against ``trl_r16`` and ``unsloth_r16``
``--tiny`` runs the peers alone on a tiny random Llama, on the CPU where there is no GPU (a smoke test).
MFU counts 4 x 6.9e9 FLOPs per real token (forward 2N, backward to activations 2N; the frozen base gets no weight
gradients) against the 790 TFLOP/s bf16 matrix rate measured on this machine kind; attention is not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.train_peers import PEER_RUNS, peer_ratios, run_peer
from service.jobs.models import Progress
from workers.training.recipe import train
from workers.training.spec import CudaOptions, Hooks, TrainingSpec

PEAK_FLOPS = 790e12
PARAMS = 6.9e9
FLOPS_PER_TOKEN = 4 * PARAMS
USER_JOB_SAMPLES = 300 * 3
LENGTHS_FILE = Path(__file__).resolve().parent / "seed_lengths.json"
Row = tuple[list[int], list[int]]


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ---------------------------------------------------------------------------------------------- model, samples
def build_checkpoint(
    path: Path, hidden: int = 4096, intermediate: int = 11008, layers: int = 30, heads: int = 32, seed: int = 0
) -> None:
    """A random bf16 Llama with DeepSeek-LLM-7B's vocabulary and special tokens, initialised on the GPU and saved in
    HF format: by default of the 7B's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    config = LlamaConfig(
        vocab_size=102400,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=100000,
        eos_token_id=100001,
        pad_token_id=100001,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def make_rows() -> tuple[list[Row], dict[str, Any]]:
    """Random-token samples with the seed instructions' prompt/full lengths, in the epoch-0 order (seed 42)."""
    from workers.training.steps import epoch_order

    meta = json.loads(LENGTHS_FILE.read_text())
    gen = torch.Generator().manual_seed(0)
    rows = []
    for prompt_len, full_len in meta["lengths"]:
        ids = torch.randint(100, 100000, (full_len,), generator=gen).tolist()
        rows.append((ids, [-100] * prompt_len + ids[prompt_len:]))
    order = epoch_order([len(ids) for ids, _ in rows], 16, 42, 0)
    return [rows[i] for i in order], meta


def take(rows: list[Row], start: int, count: int) -> list[Row]:
    return [rows[(start + i) % len(rows)] for i in range(count)]


# ------------------------------------------------------------------------------------------------- measuring
def measure(name: str, step: Callable[[], tuple[int, int, int]], warm: int, timed: int) -> dict[str, Any]:
    """Run ``warm`` then ``timed`` optimizer steps; ``step`` returns (real tokens, processed tokens, samples)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    real = processed = samples = 0
    for _ in range(timed):
        r, p, s = step()
        real, processed, samples = real + r, processed + p, samples + s
    torch.cuda.synchronize()
    return summarise(name, time.perf_counter() - started, timed, real, processed, samples)


def summarise(name: str, seconds: float, steps: int, real: float, processed: float, samples: int) -> dict[str, Any]:
    rate = real / seconds
    result = {
        "variant": name,
        "steps": steps,
        "step_s": round(seconds / steps, 4),
        "real_tokens_per_s": round(rate),
        "processed_tokens_per_s": round(processed / seconds),
        "samples_per_s": round(samples / seconds, 2),
        "mfu": round(rate * FLOPS_PER_TOKEN / PEAK_FLOPS, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "projected_user_job_s": round(USER_JOB_SAMPLES / (samples / seconds), 1),
    }
    log("RESULT", json.dumps(result))
    return result


def profile(step: Callable[[], tuple[int, int, int]], path: Path) -> None:
    """Where the GPU time of two optimizer steps goes, by kernel (written to ``path`` and printed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    write_profile(prof, path, 2)


def write_profile(prof: Any, path: Path, steps: int) -> None:
    """A finished profiler's kernels by GPU time (to ``path``, and printed)."""
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    except (AttributeError, KeyError):  # torch before the device_* names
        table = averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    path.write_text(table)
    log(f"PROFILE ({steps} steps)\n" + table)


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- the variants
def packed_variant(
    base: Any,
    rows: list[Row],
    name: str,
    *,
    per_step: int = 16,
    per_micro: int = 16,
    targets: list[str] | None = None,
    r: int = 8,
    fused_ce: Any = None,
    grad_ckpt: bool = False,
    warm: int = 6,
    timed: int = 10,
    profile_to: Path | None = None,
    attn: str | None = None,
    bucket: int = 256,
) -> tuple[dict[str, Any], Any]:
    """FlashTune's CUDA path: packed rows, bf16 autocast, fused AdamW, optional fused linear CE."""
    from peft import LoraConfig, get_peft_model

    from workers.training.packing import pack, packed_loss

    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets or ["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    previous_attn = base.config._attn_implementation
    if attn:
        base.set_attn_implementation(attn)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=True)
    cursor = [0]

    def step() -> tuple[int, int, int]:
        chosen = take(rows, cursor[0], per_step)
        cursor[0] += per_step
        micro = [pack(chosen[i : i + per_micro], bucket) for i in range(0, per_step, per_micro)]
        denominator = sum(b.num_target_tokens for b in micro)
        for batch in micro:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = packed_loss(model, batch, "cuda", denominator, fused_ce)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(b.num_real_tokens for b in micro), sum(b.num_tokens for b in micro), per_step

    try:
        result = measure(name, step, warm, timed)
        if profile_to is not None:
            profile(step, profile_to)
    finally:
        optimizer.state.clear()
        if attn:
            base.set_attn_implementation(previous_attn)
        if grad_ckpt:
            model.gradient_checkpointing_disable()
        base = model.unload()
        cleanup()
    return result, base


def hf_variant(base: Any, rows: list[Row], fp16: bool, warm: int = 2, timed: int = 6) -> dict[str, Any]:
    """The user's recipe through transformers Trainer: padded to 512, 4 x 4, grad ckpt, paged 8-bit AdamW."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments

    steps = warm + timed
    data = take(rows, 0, 16 * steps)

    class Padded(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids, labels = data[i]
            pad = 512 - len(ids)
            return {
                "input_ids": torch.tensor(ids + [100001] * pad),
                "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                "labels": torch.tensor(labels + [-100] * pad),
            }

    class Timer(TrainerCallback):  # type: ignore[misc]
        times: list[float] = []
        began = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    model = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    timer = Timer()
    args = TrainingArguments(
        output_dir="/tmp/hf-out",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        max_steps=steps,
        learning_rate=2e-4,
        fp16=fp16,
        bf16=not fp16,
        gradient_checkpointing=True,
        optim="paged_adamw_8bit",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=42,
    )
    torch.cuda.reset_peak_memory_stats()
    try:
        Trainer(model=model, args=args, train_dataset=Padded(), callbacks=[timer]).train()
        seconds = timer.times[-1] - timer.times[warm - 1]
        mean_len = statistics.mean(len(ids) for ids, _ in data)
        name = f"hf: Trainer user recipe ({'fp16' if fp16 else 'bf16'}, padded 512, 4x4, grad ckpt, paged 8-bit)"
        result = summarise(name, seconds, timed, 16 * timed * mean_len, 16 * timed * 512, 16 * timed)
        # Over its whole loop, warm-up steps included, as the worker's real_tokens_per_s is measured
        result["loop_real_tokens_per_s"] = round(16 * steps * mean_len / (timer.times[-1] - timer.began))
        return result
    finally:
        model.unload()
        cleanup()


def bf16_base_variant(checkpoint: str, rows: list[Row], fused: Any, results: list[dict[str, Any]]) -> None:
    """The same packed loop on an unquantised bf16 base (``quantization: "none"``): what NF4 dequantising costs."""
    from service.llm.modeling import load_model, plan_load

    try:
        base = load_model(checkpoint, plan_load("cuda", "none"))
        result, base = packed_variant(
            base, rows, "bf16 base (quantization none): packed 16/row, liger, no ckpt", fused_ce=fused, timed=20
        )
        results.append(result)
    except Exception:  # noqa: BLE001 - reported, the run goes on
        log(f"VARIANT bf16base FAILED\n{traceback.format_exc()}")
        results.append({"variant": "bf16base", "error": traceback.format_exc()[-2000:]})
    finally:
        base = None
        cleanup()


def seed_spec(
    checkpoint: str,
    dataset: str,
    name: str,
    memory_cap_gib: float | None = None,
    cuda: CudaOptions = CudaOptions(),
    compute_dtype: str = "auto",
    cuda_capability: str = "",
    **overrides: Any,
) -> TrainingSpec:
    """The job the worker would train on the user's seed instructions: real text through the built-in tokenizer
    (saved beside the checkpoint), duplicates dropped as POST /datasets does, 10% held out as the worker's job
    loads it with the recipe's seed (42; with another ``seed`` in ``overrides`` too, so that runs of other seeds are
    judged on the same held-out samples); the user's recipe (3 epochs, 16 samples per step, lr 2e-4, r 8 q/v)
    unless ``overrides`` (the job's hyperparameters, ``step_order`` among them) say otherwise. ``memory_cap_gib`` is
    ``FLASHTUNE_GPU_MEMORY_GIB``; ``cuda`` turns pieces of the CUDA path off (``WORKER_RUNS``); ``compute_dtype`` and
    ``cuda_capability`` are ``FLASHTUNE_COMPUTE_DTYPE`` and ``FLASHTUNE_CUDA_CAPABILITY``."""
    from service.datasets.store import hold_out
    from service.jobs.hyperparameters import Hyperparameters, resolve
    from service.llm.builtin.model import builtin_tokenizer
    from service.llm.prompts import Example

    builtin_tokenizer().save_pretrained(checkpoint)
    rows = [json.loads(line) for line in Path(dataset).read_text().splitlines() if line.strip()]
    unique = dict.fromkeys((r["instruction"], r.get("input", ""), r["output"]) for r in rows if r.get("output"))
    examples = [Example(*key) for key in unique]
    hp = resolve(Hyperparameters(**overrides), "deepseek-7b-shaped")
    train_set, validation = hold_out(examples, hp.validation_fraction, HOLD_OUT_SEED)  # one split for every seed
    return TrainingSpec(
        job_id=1,
        base_model="deepseek-7b-shaped",
        base_source=checkpoint,
        dataset=Path(dataset).name,
        dataset_sha256=None,
        train=train_set,
        validation=validation,
        hp=hp,
        job_dir=Path(f"/tmp/bench-job-{name}"),
        adapter_dir=Path(f"/tmp/bench-adapters/{name}"),
        device="cuda",
        checkpoint_every=10_000,
        gpu_memory_gib=memory_cap_gib,
        cuda=cuda,
        compute_dtype=compute_dtype,
        cuda_capability=cuda_capability,
    )


# The worker variants: each a TrainingSpec's options (seed_spec's arguments). ``worker_before`` plans as the worker
# did before varlen attention and Liger's layer kernels (sdpa with the dense packed mask, transformers'
# RMSNorm/RoPE/SwiGLU); it must run before any other worker variant, since Liger's RoPE replaces a module-level
# function for the whole process. ``worker_eager``: no CUDA graphs. ``worker_dequantize_twice``: bitsandbytes' own
# 4-bit layers, which dequantise each weight in the backward pass again. ``worker_unbalanced``: the steps as
# shuffled, not balanced by tokens, and rows rounded up to 256 tokens (the worker before session 9);
# ``worker_shuffled``: the worker as it ships with the job's ``step_order`` hyperparameter "shuffled".
# ``worker_fp16``: fp16 with loss scaling on this card's plan; ``worker_t4_plan``: the plan a T4 gets (fp16, sdpa with
# the packed mask, graphed), within 15 GiB.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R16: dict[str, Any] = {"lora_r": 16, "lora_alpha": 32.0, "target_modules": ALL_LINEAR}  # the all-linear r 16 job
DEFAULT_CHECKPOINT = "/tmp/deepseek-7b-shaped"
HOLD_OUT_SEED = 42  # the recipe's default seed: the held-out split the worker makes for the user's job
# The keys that need the NF4 base this process loads (run_on_one_base); the exactness checks run with them
BASE_KEYS = {"flex", "sdpa", "torchce", "r16", "mem", "mem_nockpt", "bf16base", "hf", "exactness"}
WORKER_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("worker_before", {"cuda": CudaOptions(varlen=False, fused_layers=False, keep_dequantized=False, graphs=False)}),
    ("graph_exactness", {}),  # not a training run: graph_exactness()
    ("worker_eager", {"cuda": CudaOptions(graphs=False)}),
    ("worker_dequantize_twice", {"cuda": CudaOptions(keep_dequantized=False)}),
    ("worker_unbalanced", {"step_order": "shuffled", "cuda": CudaOptions(row_multiple=256)}),
    ("worker_shuffled", {"step_order": "shuffled"}),
    ("worker", {}),
    ("worker_r16", {"lora_r": 16, "lora_alpha": 32.0, "target_modules": ALL_LINEAR}),
    ("worker_cap7", {"memory_cap_gib": 7.0}),  # the user's recipe on a 7 GiB budget
    ("worker_b4", {"batch_size": 4}),
    ("worker_fp16", {"compute_dtype": "float16"}),
    ("worker_t4_plan", {"compute_dtype": "float16", "cuda_capability": "7.5", "memory_cap_gib": 15.0}),
    # within the peers' own peak memory (session 12, H100: TRL 13.9 GiB at r 8 q/v, Unsloth 17.95 at r 16 all-linear)
    ("worker_cap13", {"memory_cap_gib": 13.0}),
    ("worker_cap15", {"memory_cap_gib": 15.0}),  # within TRL's peak reserved memory (15.12 GiB, session 14)
    # the worker's own spread of held-out loss over seeds (shuffle, LoRA init, dropout), against the peers'
    ("worker_seed1", {"seed": 1}),
    ("worker_seed2", {"seed": 2}),
    ("worker_r16_cap17", {**R16, "memory_cap_gib": 17.0}),
    # within the faster peer's peak memory at r 16 (TRL: 20.2 GiB allocated, session 12)
    ("worker_r16_cap20", {**R16, "memory_cap_gib": 20.0}),
    ("worker_r16_cap21", {**R16, "memory_cap_gib": 21.0}),
    # the worker's job as it ships, with steps PROFILED_STEPS profiled by kernel (``{key}_profile.txt``)
    ("worker_profile", {}),
]
PROFILED_STEPS = (12, 15)  # after the warm-up and the first epoch's evaluation: three steady steps


def trainer_variant(spec: TrainingSpec, name: str, profile_to: Path | None = None) -> dict[str, Any]:
    """The real ``workers.training.recipe.train`` on ``spec``: load, CUDA plan, packed loop, evaluate, publish.
    ``train_seconds`` is the training steps of the user's job, measured, not projected. ``profile_to``: where the
    kernels of steps :data:`PROFILED_STEPS` go, by GPU time (the profiler slows those steps: not for the pace)."""
    progress: list[Progress] = []
    events: list[str] = []
    epochs: list[dict[str, Any]] = []
    stamps: list[float] = []
    profiler = None

    def on_progress(p: Progress, force: bool) -> None:
        nonlocal profiler
        progress.append(p)
        stamps.append(time.perf_counter())
        if profile_to is not None and len(progress) == PROFILED_STEPS[0]:
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            profiler.start()
        elif profiler is not None and profile_to is not None and len(progress) == PROFILED_STEPS[1]:
            torch.cuda.synchronize()
            profiler.stop()
            write_profile(profiler, profile_to, PROFILED_STEPS[1] - PROFILED_STEPS[0])
            profiler = None

    def on_event(kind: str, message: str, data: dict[str, Any] | None) -> None:
        events.append(f"{kind}: {message}")
        if kind == "epoch" and data:
            epochs.append(data)

    hooks = Hooks(on_progress=on_progress, on_event=on_event)
    # From step 0: train() leaves its checkpoints (the worker removes them once the job's success is recorded), so an
    # earlier run of this variant on the same machine would otherwise be resumed from its last checkpoint.
    shutil.rmtree(spec.job_dir, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    try:
        info = train(spec, hooks)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)  # the memory cap's, if any
    result = {
        "key": name,
        "variant": f"workers.training.recipe.train ({name}): {len(spec.train)} seed samples x {spec.hp.epochs} epochs",
        "hyperparameters": spec.hp.model_dump(),
        "durations": info["durations"],
        "total_steps": info["total_steps"],
        **pace(progress, stamps, info["durations"]["train_seconds"]),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "accuracy": {k: info["metrics"].get(k, {}).get("accuracy") for k in ("base", "adapter")},
        "epoch_losses": [round(d["loss"], 5) for d in epochs],
        "eval_losses": [None if d.get("eval_loss") is None else round(d["eval_loss"], 5) for d in epochs],
        "events": events,
        "adapter_files": sorted(p.name for p in spec.adapter_dir.iterdir()),
    }
    log("TRAINER", json.dumps(result, default=str))
    cleanup()
    return result


def pace(progress: list[Progress], stamps: list[float], train_seconds: float) -> dict[str, Any]:
    """Tokens/s over the loop (the per-epoch eval and checkpoints included) and per median step (the steady
    pace), with every step's interval: where the loop's time beyond the steady steps goes."""
    tokens_per_s = progress[-1].tokens_per_second
    tokens_per_step = tokens_per_s * train_seconds / len(progress) if tokens_per_s else 0
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    median_step = statistics.median(intervals)
    return {
        "real_tokens_per_s": tokens_per_s,
        "mfu": round(tokens_per_s * FLOPS_PER_TOKEN / PEAK_FLOPS, 4) if tokens_per_s else None,
        "median_step_s": round(median_step, 4),
        "steady_tokens_per_s": round(tokens_per_step / median_step, 1),
        "steady_mfu": round(tokens_per_step / median_step * FLOPS_PER_TOKEN / PEAK_FLOPS, 4),
        "step_intervals_s": [round(t, 3) for t in intervals],
    }


# ------------------------------------------------------------------------------------------------------ checks
def graph_exactness(checkpoint: str, rows: list[Row]) -> dict[str, Any]:
    """The graphed training pass against the eager one: loss and LoRA gradients on real-length rows; and the
    forward-only graph of the validation loss against the eager pass.

    LoRA dropout is 0 here, so both passes compute the same function; the rows hold 16, 9 and 3 samples (the
    graph pads the boundaries with empty segments). Run it before any other worker variant (Liger's RoPE).
    """
    from service.jobs.hyperparameters import Hyperparameters, resolve
    from service.llm.modeling import load_model, plan_load
    from workers.training.cuda.plan import plan_cuda
    from workers.training.packing import packed_loss
    from workers.training.recipe import attach_lora

    hp = resolve(Hyperparameters(lora_dropout=0.0), "deepseek-7b-shaped")
    plan_ = plan_load("cuda", "auto")
    model = attach_lora(load_model(checkpoint, plan_), hp, plan_)
    step_tokens = max(sum(len(r[0]) for r in take(rows, s, 16)) for s in range(0, len(rows) - 16, 16))
    plan = plan_cuda(model, step_tokens, 512, 0, 16)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = {"plan": plan.describe(), "rows": []}
    for count in (16, 9, 3):
        [batch] = plan.pack(take(rows, 0, count), 0)
        results = []
        for graphed in (True, False):
            for p in trainable:
                p.grad = torch.zeros_like(p)
            if graphed:
                loss = plan.loss(model, batch, batch.num_target_tokens)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = packed_loss(model, batch, "cuda", batch.num_target_tokens, plan.fused_ce)
            loss.backward()
            results.append((float(loss), torch.cat([p.grad.flatten() for p in trainable])))
        (lg, gg), (le, ge) = results
        out["rows"].append(
            {
                "samples": count,
                "tokens": batch.num_tokens,
                "loss_graphed": lg,
                "loss_eager": le,
                "grad_rel_diff": float((gg - ge).norm() / ge.norm()),
            }
        )
    # The validation loss: the forward-only graph, captured in eval mode, against the eager pass
    model.eval()
    out["forward_only_graph"] = plan.graphed is not None and plan.graphed.forward_only is not None
    out["eval_rows"] = []
    with torch.no_grad():
        for count in (16, 9, 3):
            [batch] = plan.pack(take(rows, 0, count), 0)
            graphed_loss = float(plan.loss(model, batch, batch.num_target_tokens))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                eager_loss = float(packed_loss(model, batch, "cuda", batch.num_target_tokens, plan.fused_ce))
            out["eval_rows"].append({"samples": count, "loss_graphed": graphed_loss, "loss_eager": eager_loss})
    log("GRAPH EXACTNESS", json.dumps(out))
    del model, plan
    cleanup()
    return out


@torch.no_grad()
def exactness_on_gpu(model: Any, rows: list[Row], attention: str = "sdpa") -> dict[str, Any]:
    """Per-sample loss of a packed row vs each sample alone (sdpa, unpacked), on the NF4 7B model in bf16."""
    from workers.training.packing import pack, per_sample_losses, register_varlen_attention

    register_varlen_attention()
    samples = rows[:4]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.set_attn_implementation("sdpa")
        alone = [per_sample_losses(model, pack([s]), "cuda")[0] for s in samples]
        model.set_attn_implementation(attention)
        packed = per_sample_losses(model, pack(samples, pad_to_multiple=64), "cuda")
        model.set_attn_implementation("sdpa")
    rel = max(abs(a - b) / abs(b) for a, b in zip(packed, alone, strict=True))
    result = {
        "attention": attention,
        "packed": [round(x, 3) for x in packed],
        "alone": [round(x, 3) for x in alone],
        "max_rel_diff": rel,
    }
    log("EXACTNESS", json.dumps(result))
    return result


def liger_fused_ce() -> Any:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")
    except Exception as exc:  # noqa: BLE001 - optional; report and go on without it
        log("liger unavailable:", repr(exc))
        return None


# --------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--out", default=".")
    parser.add_argument("--dataset", default="../shared/data/seed/instructions.jsonl")
    parser.add_argument("--only", default="", help="comma-separated variant keys to run (default: all)")
    parser.add_argument("--tiny", action="store_true", help="the peers alone, on a tiny random Llama (CPU smoke test)")
    parser.add_argument("--peer-timeout", type=float, default=300, help="seconds each peer's process may take")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    if args.tiny:
        tiny_run(args, out, only)
        return
    import torch._dynamo

    # flex attention is compiled per row length; the rows are bucketed to 256 tokens, which still gives more
    # lengths than dynamo's default recompile limit (8) across the variants, after which it would run eagerly.
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}

    def save() -> None:
        (out / "train_gpu.json").write_text(json.dumps(report, indent=2))

    if only and not only & BASE_KEYS:
        build_checkpoint(Path(args.checkpoint))  # nothing else needs the shared NF4 base in this process
    else:
        run_on_one_base(args.checkpoint, out, only, report, save)
    for key, options in WORKER_RUNS:
        if only and key not in only:
            continue
        try:
            if key == "graph_exactness":
                report[key] = graph_exactness(args.checkpoint, make_rows()[0])
                continue
            profile_to = out / f"{key}.txt" if key.endswith("_profile") else None
            spec = seed_spec(args.checkpoint, args.dataset, key, **options)
            results.append(trainer_variant(spec, key, profile_to))
        except Exception:  # noqa: BLE001 - reported
            log(f"TRAINER {key} FAILED\n{traceback.format_exc()}")
            results.append({"variant": key, "error": traceback.format_exc()[-3000:]})
        save()
    run_peers(args.checkpoint, args.dataset, False, args.peer_timeout, only, results, save)
    report["ratios"] = ratios(results)
    report["peer_ratios"] = peer_ratios(results)
    save()
    print(json.dumps({"ratios": report["ratios"], "peer_ratios": report["peer_ratios"]}, indent=2))
    print_table(results)


def run_peers(
    checkpoint: str,
    dataset: str,
    tiny: bool,
    timeout: float,
    only: set[str],
    results: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """The peers (``PEER_RUNS``), each in its own process; ``unsloth_d0`` and the other seeds only when ``--only``
    names them. Once an Unsloth variant fails before Unsloth imported, the others are reported with its reason
    instead of run."""
    no_unsloth = ""
    for key in PEER_RUNS:
        if (only and key not in only) or (not only and key in {"unsloth_d0", "trl_seed1", "trl_seed2"}):
            continue
        if no_unsloth and PEER_RUNS[key][0] == "unsloth":
            results.append({"variant": key, "error": no_unsloth, "reason": f"not run: {no_unsloth}"})
            continue
        result = run_peer(key, checkpoint, dataset, tiny, timeout)
        if PEER_RUNS[key][0] == "unsloth" and "error" in result and "import_unsloth_s" not in result:
            no_unsloth = f"Unsloth did not import in {key}: {result.get('reason')}"
        results.append(result)
        save()


def tiny_run(args: argparse.Namespace, out: Path, only: set[str]) -> None:
    """The peers on a tiny random Llama with the built-in tokenizer; float32 on the CPU (no NF4, bf16 or Liger)."""
    from bench.job_api_gpu import build

    checkpoint = args.checkpoint if args.checkpoint != DEFAULT_CHECKPOINT else "/tmp/ft-tiny-llama"
    build(Path(checkpoint), tiny=True)
    results: list[dict[str, Any]] = []
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": True}
    report.update(torch=torch.__version__, results=results)

    def save() -> None:
        (out / "train_gpu.json").write_text(json.dumps(report, indent=2))

    run_peers(checkpoint, args.dataset, True, args.peer_timeout, only, results, save)
    report["peer_ratios"] = peer_ratios(results)
    save()
    print_table(results)


def run_on_one_base(
    checkpoint: str, out: Path, only: set[str], report: dict[str, Any], save: Callable[[], None]
) -> None:
    """The variants that share one loaded NF4 base: the exactness checks, the packed loops, bf16base and hf."""
    from service.llm.modeling import load_model, plan_load
    from workers.training.packing import VARLEN

    started = time.perf_counter()
    build_checkpoint(Path(checkpoint))
    report["build_save_s"] = round(time.perf_counter() - started, 1)
    log("checkpoint ready", report["build_save_s"], "s")
    started = time.perf_counter()
    base = load_model(checkpoint, plan_load("cuda", "auto"))
    report["load_nf4_s"] = round(time.perf_counter() - started, 1)
    report["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    log("loaded NF4 in", report["load_nf4_s"], "s;", report["weights_gib"], "GiB allocated")
    rows, meta = make_rows()
    report["mean_real_tokens"] = meta["mean_tokens"]
    report["exactness"] = exactness_on_gpu(base, rows)
    report["exactness_varlen"] = exactness_on_gpu(base, rows, VARLEN)
    fused = liger_fused_ce()
    results: list[dict[str, Any]] = report["results"]
    for key, fn in packed_runs(rows, fused, out / "profile_packed_flex.txt"):
        if only and key not in only:
            continue
        try:
            result, base = fn(base)
            results.append(result)
        except Exception:  # noqa: BLE001 - a failed variant is reported, the others still run
            log(f"VARIANT {key} FAILED\n{traceback.format_exc()}")
            results.append({"variant": key, "error": traceback.format_exc()[-2000:]})
            cleanup()
        save()
    if "bf16base" in only:
        bf16_base_variant(checkpoint, rows, fused, results)
        save()
    if not only or "hf" in only:
        for fp16 in (True, False):
            try:
                results.append(hf_variant(base, rows, fp16))
                break
            except Exception:  # noqa: BLE001 - fp16 may fail on NF4; then bf16
                log(f"HF Trainer fp16={fp16} FAILED\n{traceback.format_exc()}")
                results.append({"variant": f"hf fp16={fp16}", "error": traceback.format_exc()[-2000:]})
                cleanup()
            save()
    del base
    cleanup()


def packed_runs(
    rows: list[Row], fused: Any, profile_to: Path
) -> list[tuple[str, Callable[[Any], tuple[dict[str, Any], Any]]]]:
    """The packed-loop variants by key: each takes the base and gives back its result and the base."""
    flex = "flex_attention"
    return [
        (
            "flex",
            lambda b: packed_variant(
                b,
                rows,
                "packed 16/row + liger FLCE + flex attention, no ckpt",
                fused_ce=fused,
                attn=flex,
                timed=20,
                profile_to=profile_to,
            ),
        ),
        (
            "sdpa",
            lambda b: packed_variant(
                b, rows, "packed 16/row + liger FLCE + sdpa (cuDNN, dense mask), no ckpt", fused_ce=fused, timed=20
            ),
        ),
        ("torchce", lambda b: packed_variant(b, rows, "packed 16/row + torch CE + sdpa, no ckpt")),
        (
            "r16",
            lambda b: packed_variant(
                b,
                rows,
                "all-linear r16: packed 16/row + liger + flex, no ckpt",
                targets=ALL_LINEAR,
                r=16,
                fused_ce=fused,
                attn=flex,
                timed=10,
            ),
        ),
        (
            "mem",
            lambda b: packed_variant(
                b,
                rows,
                "user config memory: packed 4 samples x accum 4, ckpt, liger, flex",
                per_micro=4,
                grad_ckpt=True,
                fused_ce=fused,
                attn=flex,
                timed=6,
            ),
        ),
        (
            "mem_nockpt",
            lambda b: packed_variant(
                b,
                rows,
                "packed 4 samples x accum 4, no ckpt, liger, flex",
                per_micro=4,
                fused_ce=fused,
                attn=flex,
                timed=6,
            ),
        ),
    ]


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each worker variant against the HF Trainer of the same run: steady against steady, loop against loop."""
    ok = [r for r in results if "error" not in r]
    hf = next((r for r in ok if r["variant"].startswith("hf")), None)
    if hf is None:
        return {}
    return {
        r.get("key", r["variant"]): {
            "steady_over_hf_steady": round(r["steady_tokens_per_s"] / hf["real_tokens_per_s"], 2),
            "loop_over_hf_loop": round(r["real_tokens_per_s"] / hf["loop_real_tokens_per_s"], 2),
            "loop_over_hf_steady": round(r["real_tokens_per_s"] / hf["real_tokens_per_s"], 2),
        }
        for r in ok
        if "steady_tokens_per_s" in r
    }


def print_table(results: list[dict[str, Any]]) -> None:
    ok = [r for r in results if "error" not in r]
    hf = next((r for r in ok if r["variant"].startswith("hf")), None)
    print(f"\n{'variant':<88} {'real tok/s':>10} {'x hf':>6} {'MFU':>6} {'peak GiB':>8} {'job s':>7}")
    for r in ok:
        ratio = r["real_tokens_per_s"] / hf["real_tokens_per_s"] if hf else math.nan
        job_s = r.get("projected_user_job_s") or r.get("durations", {}).get("train_seconds", math.nan)
        print(
            f"{r['variant'][:88]:<88} {r['real_tokens_per_s']:>10} {ratio:>6.2f} {r['mfu'] or 0:>6.3f} "
            f"{r['peak_gib'] or 0:>8.2f} {job_s:>7.1f}"
        )
    for r in results:
        if "error" in r:
            print(f"FAILED {r['variant']}: {r.get('reason') or (r['error'].strip().splitlines() or ['?'])[-1]}")


if __name__ == "__main__":
    main()
