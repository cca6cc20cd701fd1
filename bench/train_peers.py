"""The training benchmark's peers: TRL's ``SFTTrainer`` and Unsloth on the worker's own job, each in a process of
its own (``bench/train_gpu.py`` starts them; Liger's and Unsloth's patches of transformers stay in that process).

The job is ``bench.train_gpu.seed_spec``'s: the user's seed instructions (duplicates dropped, 10% held out with the
recipe's seed), 3 epochs, 16 samples per optimizer step, lr 2e-4 with the worker's linear schedule and warm-up
(ceil(5% of the steps)), no weight decay, gradients clipped at 1.0, seed 42, LoRA q/v r 8 alpha 16 or all-linear
r 16 alpha 32, dropout 0.05. The samples are the worker's texts, as prompt-completion pairs: the prompt is
``render_prompt``'s, the completion the response; the peers append EOS, tokenise and put the loss on the completion
only, as the worker does (``same_tokens_as_flashtune`` counts the samples whose token ids equal the worker's).

``trl``: the base loaded by transformers in NF4 (double quantisation, bf16 compute, as FlashTune loads it), LoRA
by ``peft_config``; ``SFTConfig(padding_free=True, max_length=None, use_liger_kernel=True, bf16=True,
gradient_checkpointing=False, optim="adamw_torch_fused")``: TRL's speed settings (docs: "Speeding up training",
"Liger Kernel Integration"). Padding-free wants a FlashAttention implementation: ``flash_attention_2`` where
``flash_attn`` is installed, else ``sdpa`` (transformers then builds the block-diagonal mask from the position ids).

``unsloth``: ``FastLanguageModel.from_pretrained(load_in_4bit=True)`` (its NF4: double quantisation, bf16) and
``FastLanguageModel.get_peft_model`` with the job's LoRA, no gradient checkpointing (memory allows), then TRL's
``SFTTrainer`` as Unsloth patches it, with the same ``SFTConfig`` (``padding_free=True``; Unsloth's own kernels
instead of Liger's). Unsloth is not installed on the GPU machine: ``bench/pack_unsloth.py`` packs it and its
small dependencies into ``.unsloth/unsloth-site.zip``, which this process unpacks under /tmp and puts first on
``sys.path``. ``unsloth_d0``: the same with LoRA dropout 0, Unsloth's fast path for its LoRA kernels.

Figures, as ``trainer_variant``'s: the loop's real tokens/s (prompt + response + EOS tokens over the training time,
per-epoch evaluation included), the steady rate (mean tokens per step over the median step interval), peak GPU
memory (the process's, the load included), each epoch's mean step loss and the held-out loss after each epoch
(one evaluation batch of the whole held-out split: the mean over its response tokens, as the worker's).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UNSLOTH_ZIP = ROOT / ".unsloth" / "unsloth-site.zip"
UNSLOTH_SITE = Path("/tmp/ft-unsloth-site")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV8: dict[str, Any] = {}  # the user's recipe: q/v, r 8, alpha 16
R16: dict[str, Any] = {"lora_r": 16, "lora_alpha": 32.0, "target_modules": ALL_LINEAR}
# key: (tool, the job's hyperparameter overrides, tool options)
PEER_RUNS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "trl": ("trl", QV8, {}),
    "trl_r16": ("trl", R16, {}),
    "unsloth": ("unsloth", QV8, {}),
    "unsloth_r16": ("unsloth", R16, {}),
    "unsloth_d0": ("unsloth", QV8, {"lora_dropout": 0.0}),
    "trl_seed1": ("trl", {"seed": 1}, {}),  # the seeds' spread of held-out loss (the split stays seed 42's)
    "trl_seed2": ("trl", {"seed": 2}, {}),
}
# FlashTune's variant each peer is compared with (bench/train_gpu.py WORKER_RUNS)
COUNTERPART = {"trl": "worker", "trl_r16": "worker_r16", "unsloth": "worker", "unsloth_r16": "worker_r16"}
COUNTERPART["unsloth_d0"] = "worker"
COUNTERPART |= {"trl_seed1": "worker_seed1", "trl_seed2": "worker_seed2"}


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ------------------------------------------------------------------------------------------------ the parent
def run_peer(key: str, checkpoint: str, dataset: str, tiny: bool, timeout: float) -> dict[str, Any]:
    """``key`` in a child process: its result, or ``{"variant": key, "error": ..., "reason": one line}``. The
    child's output is printed as it comes, each line prefixed with the key."""
    result_path = Path(f"/tmp/ft-peer-{key}-{os.getpid()}.json")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.train_peers", key, "--checkpoint", checkpoint, "--dataset", dataset]
    cmd += ["--result", str(result_path)] + (["--tiny"] if tiny else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.perf_counter()
    log(f"PEER {key}: starting", " ".join(cmd[1:]))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"[{key}] {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the child's own session: it and anything it started
        rc, timed_out = proc.wait(), True
    reader.join(timeout=10)
    wall = round(time.perf_counter() - started, 1)
    try:
        result: dict[str, Any] = json.loads(result_path.read_text())
    except (OSError, ValueError):
        last = next((line for line in reversed(tail) if line.strip()), "no output")
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exited with {rc}"
        result = {"variant": key, "error": "\n".join(tail), "reason": f"{why}; last line: {last.strip()[:300]}"}
    result["process_wall_s"] = wall
    log(f"PEER {key}:", result.get("reason") or f"done in {wall} s")
    return result


def peer_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """FlashTune's worker against each peer of the same run and LoRA: steady against steady, loop against loop,
    peak memory, and the held-out loss after the last epoch of each."""
    ok = {r.get("key", r["variant"]): r for r in results if "error" not in r}
    out: dict[str, Any] = {}
    for peer, mine in COUNTERPART.items():
        if peer not in ok or mine not in ok:
            continue
        p, f = ok[peer], ok[mine]
        out[f"{mine}/{peer}"] = {
            "steady_over_peer_steady": round(f["steady_tokens_per_s"] / p["steady_tokens_per_s"], 2),
            "loop_over_peer_loop": round(f["real_tokens_per_s"] / p["real_tokens_per_s"], 2),
            "peak_gib": [f["peak_gib"], p["peak_gib"]],
            "final_eval_loss": [(f.get("eval_losses") or [None])[-1], (p.get("eval_losses") or [None])[-1]],
        }
    return out


# ------------------------------------------------------------------------------------------------- the child
def unpack_unsloth() -> Path:
    """Unsloth's packed site (``bench/pack_unsloth.py``) unpacked under /tmp, once per machine."""
    if not UNSLOTH_ZIP.exists():
        raise RuntimeError(f"{UNSLOTH_ZIP.relative_to(ROOT)} is missing: run bench/pack_unsloth.py and carry .unsloth")
    stamp = UNSLOTH_SITE / ".unpacked"
    signature = f"{UNSLOTH_ZIP.stat().st_size}:{UNSLOTH_ZIP.stat().st_mtime_ns}"
    if not stamp.exists() or stamp.read_text() != signature:
        with zipfile.ZipFile(UNSLOTH_ZIP) as z:
            z.extractall(UNSLOTH_SITE)
        stamp.write_text(signature)
    return UNSLOTH_SITE


class Clock:
    """A ``TrainerCallback``'s hooks: step end times (after a device sync), the logged losses by step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.began = self.ended = 0.0
        self.stamps: list[float] = []
        self.losses: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.began = clock.now()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.stamps.append(clock.now())

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.ended = clock.now()

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                logs = logs or {}
                if "loss" in logs:
                    clock.losses.append((state.global_step, float(logs["loss"])))
                if "eval_loss" in logs:
                    clock.evals.append((state.global_step, float(logs["eval_loss"])))

        return _Callback()


def sft_config(tool: str, hp: Any, total_steps: int, eval_batch: int, cuda: bool, out: str, **extra: Any) -> Any:
    """The ``SFTConfig`` both peers train with: TRL's speed settings on the worker's job."""
    import importlib.util

    from trl import SFTConfig  # type: ignore[import-not-found]  # bench-only, carried in .devsite

    liger = cuda and tool == "trl" and importlib.util.find_spec("liger_kernel") is not None
    return SFTConfig(
        output_dir=out,
        num_train_epochs=hp.epochs,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=1,
        per_device_eval_batch_size=max(eval_batch, 1),
        learning_rate=hp.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(hp.warmup_ratio * total_steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda,
        fp16=False,
        gradient_checkpointing=False,
        padding_free=True,
        max_length=None,  # padding-free without packing does not truncate; TRL refuses a max_length then
        completion_only_loss=True,
        use_liger_kernel=liger,
        eval_strategy="epoch" if eval_batch else "no",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=hp.seed,
        data_seed=hp.seed,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        disable_tqdm=True,
        **extra,
    )


def child(key: str, checkpoint: str, dataset: str, result_path: Path, tiny: bool) -> None:
    tool, overrides, options = PEER_RUNS[key]
    result: dict[str, Any] = {"key": key, "variant": key, "tool": tool}
    try:
        if tool == "unsloth":
            os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
            started = time.perf_counter()
            sys.path.insert(0, str(unpack_unsloth()))
            import unsloth  # type: ignore[import-not-found]  # noqa: F401 - first, before transformers, trl, peft

            result["import_unsloth_s"] = round(time.perf_counter() - started, 1)
        result.update(train_peer(key, tool, overrides, options, checkpoint, dataset, tiny))
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON, the parent goes on
        result["error"] = traceback.format_exc()[-4000:]
        result["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        log(f"PEER {key} FAILED\n{result['error']}")
    result_path.write_text(json.dumps(result, default=str))


def train_peer(
    key: str, tool: str, overrides: dict[str, Any], options: dict[str, Any], checkpoint: str, dataset: str, tiny: bool
) -> dict[str, Any]:
    import importlib.metadata
    import importlib.util

    import torch

    from bench.train_gpu import FLOPS_PER_TOKEN, PEAK_FLOPS, seed_spec
    from service.llm.prompts import render_prompt
    from workers.training.token_cache import tokenize_one

    cuda = torch.cuda.is_available()
    spec = seed_spec(checkpoint, dataset, f"peer-{key}", **overrides)
    hp = spec.hp
    dropout = options.get("lora_dropout", hp.lora_dropout)
    steps_per_epoch = math.ceil(len(spec.train) / hp.batch_size)
    total_steps = steps_per_epoch * hp.epochs
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if tool == "trl":
        model, tokenizer, attn = load_trl(checkpoint, cuda)
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]
            lora_dropout=dropout,
            target_modules=hp.target_modules,
            task_type="CAUSAL_LM",
        )
    else:
        model, tokenizer, attn = load_unsloth(checkpoint, hp, dropout, cuda)
        peft_config = None
    load_s = time.perf_counter() - started

    from datasets import Dataset  # type: ignore[import-not-found]
    from trl import SFTTrainer  # type: ignore[import-not-found]

    if not cuda:
        cpu_logprob_shim()

    def pairs(examples: list[Any]) -> Any:
        prompts = [render_prompt(e.input, e.instruction, hp.prompt_format, tokenizer) for e in examples]
        return Dataset.from_dict({"prompt": prompts, "completion": [e.output for e in examples]})

    clock = Clock(cuda)
    args = sft_config(tool, hp, total_steps, len(spec.validation), cuda, f"/tmp/ft-peer-out/{key}")
    started = time.perf_counter()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=pairs(spec.train),
        eval_dataset=pairs(spec.validation) if spec.validation else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock.callback()],
    )
    prepare_s = time.perf_counter() - started
    ids = list(trainer.train_dataset["input_ids"])
    mine = [tokenize_one(e, tokenizer, hp.prompt_format)[0] for e in spec.train]
    tokens_per_epoch = sum(len(x) for x in ids)
    log(f"{key}: {len(ids)} samples, {tokens_per_epoch} tokens an epoch, {total_steps} steps; training")
    trainer.train()
    train_s = clock.ended - clock.began
    intervals = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    total_tokens = tokens_per_epoch * hp.epochs
    rate = total_tokens / train_s
    median_step = statistics.median(intervals) if intervals else float("nan")
    steady = total_tokens / max(len(clock.stamps), 1) / median_step
    epoch_losses: dict[int, list[float]] = collections.defaultdict(list)
    for step, loss in clock.losses:
        epoch_losses[(step - 1) // steps_per_epoch + 1].append(loss)
    versions: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "liger-kernel", "unsloth", "unsloth_zoo"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "variant": f"{tool} ({key}): {len(spec.train)} seed samples x {hp.epochs} epochs, r {hp.lora_r} "
        f"{'q/v' if len(hp.target_modules) == 2 else 'all-linear'}",
        "config": {
            "base": "NF4, double quantisation, bf16 compute" if cuda else "float32 (CPU smoke test)",
            "attn_implementation": attn,
            "lora": {"r": hp.lora_r, "alpha": hp.lora_alpha, "dropout": dropout, "targets": hp.target_modules},
            "padding_free": bool(getattr(trainer, "padding_free", trainer.args.padding_free)),
            "use_liger_kernel": trainer.args.use_liger_kernel,
            "bf16": trainer.args.bf16,
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "optim": str(trainer.args.optim),
            "batch": hp.batch_size,
            "learning_rate": hp.learning_rate,
            "warmup_steps": trainer.args.warmup_steps,
            "seed": hp.seed,
            "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
            "xformers_installed": importlib.util.find_spec("xformers") is not None,
        },
        "versions": versions,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "train_samples": len(spec.train),
        "validation_samples": len(spec.validation),
        "real_tokens_per_epoch": tokens_per_epoch,
        "same_tokens_as_flashtune": sum(a == b for a, b in zip(ids, mine, strict=False)),
        "durations": {
            "load_seconds": round(load_s, 1),
            "prepare_seconds": round(prepare_s, 1),
            "train_seconds": train_s,
        },
        "total_steps": len(clock.stamps),
        "real_tokens_per_s": round(rate, 1),
        "mfu": round(rate * FLOPS_PER_TOKEN / PEAK_FLOPS, 4) if cuda else None,
        "median_step_s": round(median_step, 4),
        "steady_tokens_per_s": round(steady, 1),
        "steady_mfu": round(steady * FLOPS_PER_TOKEN / PEAK_FLOPS, 4) if cuda else None,
        "step_intervals_s": [round(t, 3) for t in intervals],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "epoch_losses": [round(sum(v) / len(v), 5) for _, v in sorted(epoch_losses.items())],
        "eval_losses": [round(loss, 5) for _, loss in clock.evals],
    }


def cpu_logprob_shim() -> None:
    """TRL 1.15's fused LM head computes the log-probabilities with Triton kernels, which a CPU-only torch lacks:
    for the CPU smoke test only, the same outputs in plain torch (the GPU runs use TRL's own kernels)."""
    import torch
    import trl.trainer.utils as trl_utils  # type: ignore[import-not-found]

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None:
        return

    class TorchLogProb:
        @staticmethod
        def apply(
            hidden: Any,
            weight: Any,
            bias: Any,
            targets: Any,
            temperature: float,
            chunk: int,
            softcap: Any,
            scale: Any,
            outputs: Any,
        ) -> tuple[Any, ...]:
            logits = torch.nn.functional.linear(hidden, weight, bias).float() * (scale or 1.0) / temperature
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            logp = logits.log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1).detach() if "entropy" in outputs else None
            top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
            return logp.gather(-1, targets[:, None]).squeeze(-1), entropy, None, None, top1

    trl_utils._ChunkedLogProbFunction = TorchLogProb  # type: ignore[attr-defined]


def load_trl(checkpoint: str, cuda: bool) -> tuple[Any, Any, str]:
    """The base as a TRL user loads it: transformers with bitsandbytes NF4 (FlashTune's quantisation settings)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") is not None else "sdpa"
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": attn}
    if cuda:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return model, tokenizer, attn


def load_unsloth(checkpoint: str, hp: Any, dropout: float, cuda: bool) -> tuple[Any, Any, str]:
    """Unsloth's 4-bit path: ``FastLanguageModel.from_pretrained(load_in_4bit=True)`` and its ``get_peft_model``
    (Unsloth's CPU backend, for the smoke test, loads the base unquantised)."""
    from unsloth import FastLanguageModel  # type: ignore[import-not-found]

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=checkpoint,
        max_seq_length=hp.max_length,
        dtype=None,
        load_in_4bit=cuda,
        use_gradient_checkpointing=False,
        local_files_only=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=hp.lora_r,
        target_modules=hp.target_modules,
        lora_alpha=hp.lora_alpha,
        lora_dropout=dropout,
        bias="none",
        use_gradient_checkpointing=False,
        random_state=hp.seed,
    )
    return model, tokenizer, str(getattr(model.config, "_attn_implementation", "?"))


def main() -> None:
    parser = argparse.ArgumentParser(description="one peer of bench/train_gpu.py, in its own process")
    parser.add_argument("key", choices=sorted(PEER_RUNS))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    child(args.key, args.checkpoint, args.dataset, Path(args.result), args.tiny)


if __name__ == "__main__":
    main()
