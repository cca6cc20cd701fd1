"""The user's whole job through the API: ``flashtune serve`` + ``flashtune worker``, from POST /jobs to adapter.

On the H200 (see docs/benchmarks.md for the command; the seed file travels in ``.devsite/seed/``):

    export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 bench/job_api_gpu.py --dataset .devsite/seed/instructions.jsonl --out $OUT

It saves a randomly initialised DeepSeek-LLM-7B-shaped checkpoint (``bench/train_gpu.build_checkpoint``) with the
built-in tokenizer under ``DATA_DIR/models/``, starts a real API and a real worker on loopback, uploads the
user's seed instructions, posts a job on that checkpoint with the default (user's) recipe, follows it to the end
and prints the wall time from POST to adapter, the job's events and its durations. ``--tiny`` builds a 2-layer
model instead, to check the script on a CPU.

``--serve`` then measures the new adapter as a client sees it, over HTTP: label-only ``POST /analyze`` latency,
and a streamed ``POST /v1/chat/completions`` (Server-Sent Events): time to the first token and tokens/s.
``FLASHTUNE_SERVE_MERGED`` (``--serve-merged``, default ``all``) decides whether that goes through the merged
bf16 copy and its graph-captured decoder or through the adapter on the NF4 base with HF ``generate``.

The T4's plan on a newer card (docs/benchmarks.md, session 11): ``--compute-dtype float16 --cuda-capability 7.5
--gpu-memory-gib 15`` gives API and worker ``FLASHTUNE_COMPUTE_DTYPE``, ``FLASHTUNE_CUDA_CAPABILITY`` and the
worker ``FLASHTUNE_GPU_MEMORY_GIB``: fp16 with loss scaling, sdpa with the packed mask instead of flash varlen,
15 GiB. ``--hide-compiler`` runs API and worker with ``CC=/bin/false`` and an empty Triton cache, as in an image
without a C compiler: Liger's kernels cannot be built, and the job must succeed on torch's own layers and say so.
The report holds the epoch and validation losses, whether every tensor of the published adapter is finite, the
job's tokens/s and peak GPU memory, and the events.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.analyze import free_port, spawn, wait_healthy  # noqa: E402
from service.core.layout import Layout, adapter_name  # noqa: E402


def build(path: Path, tiny: bool) -> None:
    from service.llm.builtin.model import builtin_tokenizer

    if not (path / "config.json").exists():
        if tiny:
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(
                vocab_size=8192,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                tie_word_embeddings=False,
            )
            LlamaForCausalLM(config).save_pretrained(path)
        else:
            from bench.train_gpu import build_checkpoint

            build_checkpoint(path)
    builtin_tokenizer().save_pretrained(path)


def _seconds_after(start: datetime, stamp: str) -> float:
    when = datetime.fromisoformat(stamp)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - start.timestamp()


NEWS = "美国11月非农就业人口增加25万人，远超预期的18万人，失业率降至3.9%。"


def measure_serving(client: httpx.Client, adapter: str, requests: int = 20, max_tokens: int = 128) -> dict[str, Any]:
    """The adapter over HTTP: label-only /analyze latency (the first request, which loads the adapter, apart) and
    three streamed chat completions of ``max_tokens`` (a random model rarely ends early; ``usage`` says)."""

    def analyze() -> float:
        started = time.perf_counter()
        response = client.post("/analyze", json={"text": NEWS, "adapter": adapter, "max_new_tokens": 0})
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000

    first = analyze()
    latencies = sorted(analyze() for _ in range(requests))
    result: dict[str, Any] = {
        "analyze_first_ms": round(first, 1),
        "analyze_label_only_p50_ms": round(statistics.median(latencies), 1),
        "analyze_label_only_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "streams": [],
    }
    body = {
        "model": adapter,
        "messages": [{"role": "user", "content": NEWS}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for _ in range(3):  # the first one also merges the adapter (with --serve-merged) and captures the decoder
        started, first_token, tokens = time.perf_counter(), None, 0
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: ") :])
                if first_token is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first_token = time.perf_counter()
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        done = time.perf_counter()
        after_first = done - (first_token or done)
        result["streams"].append(
            {
                "completion_tokens": tokens,
                "total_s": round(done - started, 3),
                "first_token_ms": round(((first_token or done) - started) * 1000, 1),
                "tokens_per_s_after_first": round((tokens - 1) / after_first, 1)
                if tokens > 1 and after_first
                else None,
            }
        )
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="/tmp/ft-gpu-job")
    parser.add_argument("--dataset", default="../shared/data/seed/instructions.jsonl")
    parser.add_argument("--hyperparameters", default="{}", help="JSON object merged into the job's hyperparameters")
    parser.add_argument("--checkpoint", help="an already saved checkpoint to use (default: build one in DATA_DIR)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--gpu-memory-gib", type=float, help="FLASHTUNE_GPU_MEMORY_GIB for the worker")
    parser.add_argument(
        "--job-process-start",
        choices=["forkserver", "spawn"],
        default="forkserver",
        help="FLASHTUNE_JOB_PROCESS_START for the worker",
    )
    parser.add_argument("--serve", action="store_true", help="then measure /analyze and streaming over HTTP")
    parser.add_argument("--serve-merged", default="all", help="FLASHTUNE_SERVE_MERGED for the API (with --serve)")
    parser.add_argument("--compute-dtype", help="FLASHTUNE_COMPUTE_DTYPE for API and worker (auto, bfloat16, float16)")
    parser.add_argument("--cuda-capability", help="FLASHTUNE_CUDA_CAPABILITY for API and worker, e.g. 7.5 (a T4)")
    parser.add_argument("--hide-compiler", action="store_true", help="CC=/bin/false and an empty Triton cache")
    parser.add_argument("--serve-gpu-memory-gib", type=float, help="FLASHTUNE_SERVE_GPU_MEMORY_GIB for the API")
    parser.add_argument("--out", default=".")
    parser.add_argument("--name", help="the result file's name under --out (default: job_api_gpu[_cap].json)")
    return parser.parse_args()


def service_env(args: argparse.Namespace, data_dir: Path, model: Path, port: int) -> dict[str, str]:
    """The environment of the API and the worker."""
    env = {
        **os.environ,
        "FLASHTUNE_DATA_DIR": str(data_dir),
        "FLASHTUNE_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "FLASHTUNE_POLL_SECONDS": "0.2",
        "FLASHTUNE_PROGRESS_INTERVAL_SECONDS": "1",
        "FLASHTUNE_ALLOWED_MODEL_ROOTS": json.dumps([str(model.parent)]),
    }
    env["FLASHTUNE_JOB_PROCESS_START"] = args.job_process_start
    if args.gpu_memory_gib:
        env["FLASHTUNE_GPU_MEMORY_GIB"] = str(args.gpu_memory_gib)
    if args.compute_dtype:
        env["FLASHTUNE_COMPUTE_DTYPE"] = args.compute_dtype
    if args.cuda_capability:
        env["FLASHTUNE_CUDA_CAPABILITY"] = args.cuda_capability
    if args.serve_gpu_memory_gib:
        env["FLASHTUNE_SERVE_GPU_MEMORY_GIB"] = str(args.serve_gpu_memory_gib)
    if args.hide_compiler:  # Triton takes CC first; a fresh cache holds no launcher built earlier
        env["CC"], env["TRITON_CACHE_DIR"] = "/bin/false", str(data_dir / "triton-cache-empty")
    if args.serve:  # the API serves adapters of one base: the job's
        env["FLASHTUNE_BASE_MODEL"], env["FLASHTUNE_SERVE_MERGED"] = str(model), args.serve_merged
    return env


def run_job(client: httpx.Client, args: argparse.Namespace, model: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Upload the dataset, post the job, follow it to its end; its figures go into ``report``."""
    with open(args.dataset, "rb") as handle:
        dataset = client.post("/datasets", files={"file": handle}).json()
    report["dataset"] = {k: dataset.get(k) for k in ("id", "num_examples", "duplicates_removed")}
    body = {"dataset": dataset["id"], "base_model": str(model), "hyperparameters": json.loads(args.hyperparameters)}
    posted, posted_at = time.perf_counter(), datetime.now(UTC)
    job: dict[str, Any] = client.post("/jobs", json=body).json()
    report["hyperparameters"] = job.get("hyperparameters")
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.get(f"/jobs/{job['id']}").json()
    report["post_to_done_s"] = round(time.perf_counter() - posted, 1)
    report["status"], report["error"] = job["status"], job.get("error")
    events = client.get(f"/jobs/{job['id']}/events").json()
    # each event with its time after the POST (seconds), to see where the job's wall time goes
    report["events"] = [
        (round(_seconds_after(posted_at, e["created_at"]), 1), e["type"], e["message"])
        for e in events.get("data", events)
    ]
    return job


def training_figures(adapter_dir: Path, report: dict[str, Any]) -> None:
    """The published adapter's durations, memory, CUDA plan, losses, accuracy and evaluation time, and whether its
    tensors are all finite, if it was published."""
    info_path = adapter_dir / "training_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        report["durations"] = info["durations"]
        report["peak_gpu_memory_gib"] = info.get("peak_gpu_memory_gib")
        report["compute_dtype"] = info.get("compute_dtype")
        report["skipped_steps"], report["loss_scale"] = info.get("skipped_steps"), info.get("loss_scale")
        report["cuda_plan"] = info.get("cuda_plan")
        report["losses"] = {k: info["losses"][k] for k in ("epoch_loss", "eval_loss")}
        report["metrics"] = {k: info["metrics"].get(k) for k in ("base", "adapter")}
        report["adapter_accuracy"] = info["metrics"].get("adapter", {}).get("accuracy")
        report["evaluation_seconds"] = info["metrics"].get("seconds")  # label scoring, generation
        report["adapter_tensors"] = adapter_tensors(adapter_dir)


def adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    """How many tensors the adapter file holds, their dtypes, and whether every value is finite."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {
        "count": len(tensors),
        "dtypes": sorted({str(t.dtype) for t in tensors.values()}),
        "all_finite": all(bool(torch.isfinite(t).all()) for t in tensors.values()),
        "max_abs": max(float(t.abs().max()) for t in tensors.values()),
    }


def gpu_memory_mib(pid: int) -> int | None:
    """GPU memory a process holds, as nvidia-smi reports it (its CUDA context included); None if not listed."""
    import subprocess

    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    lines = subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines()
    used = {int(a): int(b) for a, b in (line.split(",") for line in lines if line.count(",") == 1)}
    return used.get(pid)


def main() -> None:
    args = parse_args()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    model = (
        Path(args.checkpoint)
        if args.checkpoint
        else data_dir / "models" / ("tiny-llama" if args.tiny else "deepseek-7b-shaped")
    )
    started = time.perf_counter()
    build(model, args.tiny)
    build_s = time.perf_counter() - started

    port = free_port()
    env = service_env(args, data_dir, model, port)
    launched = time.perf_counter()
    api = spawn(["serve", "--log-level", "warning"], env, data_dir / "api.log")
    worker = spawn(["worker"], env, data_dir / "worker.log")
    report: dict[str, Any] = {"build_checkpoint_s": round(build_s, 1), "job_process_start": args.job_process_start}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_healthy(client, api)
            # the user's worker is already running when they post: wait until this one has started (a fork-server
            # worker first imports torch and transformers once, workers/preload.py), and say how long that took
            while "started (database" not in (data_dir / "worker.log").read_text(errors="replace"):
                if worker.poll() is not None:
                    raise SystemExit("the worker exited")
                time.sleep(0.2)
            report["worker_ready_s"] = round(time.perf_counter() - launched, 1)
            job = run_job(client, args, model, report)
            training_figures(Layout(data_dir).adapter_dir(adapter_name(job["id"])), report)
            report["progress"] = job.get("progress")
            if args.serve and job["status"] == "succeeded":
                report["serving"] = measure_serving(client, job["adapter"])
                report["serving"]["api_gpu_memory_mib"] = gpu_memory_mib(api.pid)
    finally:
        for proc in (worker, api):
            proc.terminate()
            proc.wait(60)
    if report.get("status") != "succeeded":
        report["worker_log_tail"] = (data_dir / "worker.log").read_text(errors="replace")[-6000:]
    print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    name = args.name or ("job_api_gpu_cap.json" if args.gpu_memory_gib else "job_api_gpu.json")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, name).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))


if __name__ == "__main__":
    main()
