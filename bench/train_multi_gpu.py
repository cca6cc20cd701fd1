"""Multi-GPU training benchmark: tokens/s of one job on 1, 2, ... N GPUs (FLASHTUNE_GPUS), 7B-shaped model.

Run on the 2-GPU H200 kind of the device machine (docs/benchmarks.md). On a host with N GPUs:

    export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python bench/train_multi_gpu.py --out $OUT                      # 1, 2 and N GPUs, the user's recipe
    python bench/train_multi_gpu.py --gpus 1,2,4,8 --batch-size 64  # more samples per step: each GPU gets more

For each GPU count it starts the ranks exactly as ``flashtune worker --gpus N`` does
(``workers.training.distributed.launch``: torchrun's launcher, NCCL, NVLink multicast off) and each rank runs the
real ``workers.training.recipe.train``: NF4 base, the CUDA path, its share of every optimizer step's samples,
gradients all-reduced. The model is ``bench/train_gpu.py``'s random DeepSeek-LLM-7B-shaped Llama (built once, saved
to ``--checkpoint``); the samples are the user's seed instructions (real text, built-in tokenizer saved beside the
checkpoint), repeated to fill ``--steps`` optimizer steps of ``--batch-size`` samples (default: the user's recipe,
16). No checkpoints, and the evaluation set (16 seed examples, also trained on) is only scored once, after the loop,
so the loop is all training. The same samples and the same order for every GPU count: each count's step losses, eval
loss and evaluation are compared with 1 GPU's.

Reported per GPU count (``train_multi_gpu.json`` and a table): the median optimizer step after ``--warm`` steps,
real (non-padding) tokens/s over the timed steps, the speed-up over 1 GPU and the scaling efficiency
(speed-up / GPUs), and rank 0's peak GPU memory. The optimizer step is the same at every count (same samples,
same learning-rate schedule), so tokens/s is directly comparable; with few samples per step each GPU gets only
a few (16 over 8 GPUs: 2 each) and the all-reduce and the slowest rank weigh more: try ``--batch-size 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_gpu import build_checkpoint, log  # noqa: E402
from service.llm.prompts import Example  # noqa: E402
from workers.training.spec import TrainingSpec  # noqa: E402


def _rank(spec: TrainingSpec, run_dir: str, launcher_pid: int) -> None:
    """One rank (started by workers.training.distributed.launch): train; rank 0 writes the time of every step."""
    from workers.retry import Outcome
    from workers.training import distributed
    from workers.training.recipe import train
    from workers.training.spec import Hooks

    dist = distributed.init_rank(spec.device, launcher_pid)
    stamps: list[tuple[int, float, float | None]] = []
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hooks = Hooks(on_progress=lambda p, force: stamps.append((p.step, time.perf_counter(), p.loss)))
    info = train(spec, distributed.rank_hooks(hooks, dist), dist)
    if dist.is_main:
        peak = torch.cuda.max_memory_allocated() / 2**30 if spec.device == "cuda" else 0.0
        evaluation = {
            "eval_loss": info["losses"]["eval_loss"],
            "metrics": info["metrics"],
            "cuda_plan": info.get("cuda_plan"),
        }
        (Path(run_dir) / "timing.json").write_text(
            json.dumps({"stamps": stamps, "peak_gib": round(peak, 2), **evaluation})
        )
    distributed.write_outcome(Path(run_dir), dist.rank, Outcome("succeeded"))
    distributed.close_rank()


def samples(dataset: Path, count: int) -> list[Example]:
    """The seed instructions (duplicates dropped, as POST /datasets does), repeated to ``count`` samples."""
    rows = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
    unique = list(dict.fromkeys((r["instruction"], r.get("input", ""), r["output"]) for r in rows if r.get("output")))
    return [Example(*unique[i % len(unique)]) for i in range(count)]


def tokens_per_step(spec: TrainingSpec, tokenizer: Any, steps: int) -> list[int]:
    """Real tokens of each optimizer step's samples (the loop's own order: workers.training.steps.epoch_order)."""
    from workers.training.batches import tokenize
    from workers.training.steps import epoch_order

    rows = tokenize(spec.train, tokenizer, spec.hp.max_length)
    order = epoch_order([len(ids) for ids, _ in rows], spec.hp.batch_size, spec.hp.seed, 0)
    size = spec.hp.batch_size
    return [sum(len(rows[i][0]) for i in order[s * size : (s + 1) * size]) for s in range(steps)]


def run_one(spec: TrainingSpec, gpus: int, per_step: list[int], warm: int) -> dict[str, Any]:
    from workers.training import distributed

    with tempfile.TemporaryDirectory(prefix=f"bench-{gpus}gpu-") as tmp:
        run_dir = Path(tmp)
        started = time.perf_counter()
        outcome = distributed.launch(_rank, (spec, str(run_dir), os.getpid()), gpus, run_dir, f"bench-{gpus}gpu")
        wall = time.perf_counter() - started
        if outcome.status != "succeeded":
            return {"gpus": gpus, "error": outcome.error}
        timing = json.loads((run_dir / "timing.json").read_text())
    stamps = timing["stamps"]
    step_times = [b[1] - a[1] for a, b in zip(stamps[warm:], stamps[warm + 1 :], strict=False)]
    timed_tokens = sum(per_step[warm + 1 : len(stamps)])  # steps warm+2 .. last, after the stamp of step warm+1
    seconds = stamps[-1][1] - stamps[warm][1]
    return {
        "gpus": gpus,
        "samples_per_step": spec.hp.batch_size,
        "timed_steps": len(step_times),
        "median_step_s": round(statistics.median(step_times), 4),
        "real_tokens_per_s": round(timed_tokens / seconds, 1),
        "peak_gib_rank0": timing["peak_gib"],
        "wall_s_with_load": round(wall, 1),
        "step_losses": [round(loss or 0.0, 5) for _, _, loss in stamps],
        "eval_loss": timing["eval_loss"],
        "accuracy": {k: v.get("accuracy") for k, v in timing["metrics"].items() if isinstance(v, dict)},
        "cuda_plan": timing.get("cuda_plan"),
    }


def smoke_cpu(args: argparse.Namespace) -> None:
    from service.jobs.hyperparameters import Hyperparameters, resolve
    from service.llm.builtin.model import ensure_builtin_model
    from service.llm.modeling import load_tokenizer

    model = ensure_builtin_model(Path(tempfile.gettempdir()) / "bench-multi-smoke")
    hp = resolve(Hyperparameters(epochs=1, validation_fraction=0.0, batch_size=4), "builtin")
    spec = TrainingSpec(
        job_id=1,
        base_model="builtin",
        base_source=str(model),
        dataset="seed",
        dataset_sha256=None,
        train=samples(Path(args.dataset), 6 * 4),
        validation=[],
        hp=hp,
        job_dir=Path(tempfile.mkdtemp(prefix="bench-multi-job-")),
        adapter_dir=Path("/tmp/bench-multi-smoke-adapter"),
        device="cpu",
        checkpoint_every=10**9,
    )
    per_step = tokens_per_step(spec, load_tokenizer(str(model)), 6)
    for gpus in (1, 2):
        log("SMOKE", json.dumps(run_one(spec, gpus, per_step, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/deepseek-7b-shaped")
    parser.add_argument("--dataset", default="../shared/data/seed/instructions.jsonl")
    parser.add_argument("--gpus", default="", help="comma-separated GPU counts (default: 1, 2 and all visible)")
    parser.add_argument("--batch-size", type=int, default=0, help="samples per optimizer step (default: recipe)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    parser.add_argument("--warm", type=int, default=4, help="steps not timed (CUDA plan, kernel set-up)")
    parser.add_argument("--out", default=".")
    parser.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="check this script on CPU: built-in model, gloo, "
        "1 and 2 processes, 6 steps of 4 samples (its figures mean nothing)",
    )
    args = parser.parse_args()
    if args.smoke_cpu:
        smoke_cpu(args)
        return

    from service.jobs.hyperparameters import Hyperparameters, resolve
    from service.llm.builtin.model import builtin_tokenizer

    visible = torch.cuda.device_count()
    counts = [int(c) for c in args.gpus.split(",") if c] or sorted({1, min(2, visible), visible})
    if args.steps < args.warm + 2:
        raise SystemExit("--steps must exceed --warm by 2 or more")
    if not visible or max(counts) > visible:
        raise SystemExit(f"needs {max(counts)} CUDA GPUs, {visible} visible")
    build_checkpoint(Path(args.checkpoint))
    tokenizer = builtin_tokenizer()
    tokenizer.save_pretrained(args.checkpoint)
    overrides: dict[str, Any] = {"epochs": 1, "validation_fraction": 0.0}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    hp = resolve(Hyperparameters(**overrides), "deepseek-7b-shaped")
    spec = TrainingSpec(
        job_id=1,
        base_model="deepseek-7b-shaped",
        base_source=args.checkpoint,
        dataset=Path(args.dataset).name,
        dataset_sha256=None,
        train=samples(Path(args.dataset), args.steps * hp.batch_size),
        validation=samples(Path(args.dataset), 16),
        hp=hp,
        job_dir=Path(tempfile.mkdtemp(prefix="bench-multi-job-")),
        adapter_dir=Path("/tmp/bench-multi-adapter"),
        device="cuda",
        checkpoint_every=10**9,
    )
    per_step = tokens_per_step(spec, tokenizer, args.steps)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "visible_gpus": visible,
        "torch": torch.__version__,
        "nccl": str(torch.cuda.nccl.version()),
        "hyperparameters": hp.model_dump(),
        "steps": args.steps,
        "warm": args.warm,
        "results": [],
    }
    out = Path(args.out) / "train_multi_gpu.json"
    for gpus in counts:
        log(f"{gpus} GPU(s): launching")
        try:
            result = run_one(spec, gpus, per_step, args.warm)
        except Exception:  # noqa: BLE001 - reported, the other counts still run
            result = {"gpus": gpus, "error": traceback.format_exc()[-3000:]}
        log("RESULT", json.dumps(result))
        report["results"].append(result)
        out.write_text(json.dumps(report, indent=2))
    ok = [r for r in report["results"] if "error" not in r]
    one = next((r for r in ok if r["gpus"] == 1), None)
    print(
        f"\n{'GPUs':>4} {'samples/step':>12} {'step s':>8} {'real tok/s':>11} {'speed-up':>8} {'efficiency':>10} "
        f"{'peak GiB':>8}"
    )
    for r in ok:
        speedup = r["real_tokens_per_s"] / one["real_tokens_per_s"] if one else float("nan")
        r["speedup"], r["efficiency"] = round(speedup, 3), round(speedup / r["gpus"], 3)
        print(
            f"{r['gpus']:>4} {r['samples_per_step']:>12} {r['median_step_s']:>8.3f} {r['real_tokens_per_s']:>11.0f} "
            f"{speedup:>8.2f} {speedup / r['gpus']:>10.2f} {r['peak_gib_rank0']:>8.2f}"
        )
    for r in ok:  # same samples, same schedule: losses agree up to bf16 and reduction-order noise
        if one and r is not one:
            pairs = zip(r["step_losses"], one["step_losses"], strict=True)
            r["max_step_loss_diff_vs_1"] = max(abs(a - b) for a, b in pairs)
            print(
                f"{r['gpus']} GPUs vs 1: max |step loss difference| {r['max_step_loss_diff_vs_1']:.4f}; eval loss "
                f"{r['eval_loss']} vs {one['eval_loss']}; accuracy {r['accuracy']} vs {one['accuracy']}"
            )
    for r in report["results"]:
        if "error" in r:
            print(f"FAILED on {r['gpus']} GPUs: {r['error']}")
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
