"""The second job on a base starts warm (issue 23, section 2): the user's job three times through a real API and
worker with the base cache on (``FLASHTUNE_BASE_CACHE_GIB``, service/llm/base_cache.py), then once with it off, in
one run on one machine:

    1. cold     the 7B shape, nothing cached: loaded and quantised as before, then saved to the cache while training
    2. warm     the same base again: loaded pre-quantised from the cache
    3. other    another base (a ~1.2B Llama of the same tokenizer): a miss, and its save evicts the 7B entry, the
                budget (``--cache-gib``, default 5) holding one of the two
    4. off      a new worker with FLASHTUNE_BASE_CACHE_GIB=0, the 7B base again: the code path as before the cache,
                on the warmest host of the run (page cache, Triton's cache, tokenised rows), the baseline for 1 and 2

For each: POST to adapter (the job ``succeeded``), the job's durations (``load_seconds`` ...), its ``base_cache``
events and epoch losses (jobs 1, 2 and 4 train the same rows from the same seed on the same weights, so their
losses must agree), and at the end the cache's entries. One JSON file, ``warm_job_gpu.json``, under ``--out``.

    export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 bench/warm_job_gpu.py --checkpoint /tmp/ft-fp16/models/deepseek-7b-shaped \\
        --dataset .devsite/seed/instructions.jsonl --out $OUT

``--tiny`` runs the same on a CPU with two 2-layer models (the cache does not apply there: float32, no
quantisation; the events say so), to check the script; ``--hyperparameters '{"epochs": 1}'`` shortens it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.analyze import free_port, spawn, wait_healthy  # noqa: E402
from bench.job_api_gpu import _seconds_after, build  # noqa: E402
from service.core.layout import Layout, adapter_name  # noqa: E402


def build_other(path: Path, tiny: bool) -> None:
    """The other base: a random Llama of the built-in tokenizer, ~1.2B parameters (2.5 GB bf16, ~1.2 GiB in NF4), or
    a 2-layer one of another width with ``tiny``."""
    from service.llm.builtin.model import builtin_tokenizer

    if not (path / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        if tiny:
            config = LlamaConfig(
                vocab_size=8192,
                hidden_size=96,
                intermediate_size=192,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                tie_word_embeddings=False,
            )
            LlamaForCausalLM(config).save_pretrained(path)
        else:  # the 7B's vocabulary and special tokens, ~1.2B parameters
            from bench.train_gpu import build_checkpoint

            build_checkpoint(path, hidden=2048, intermediate=5504, layers=16, heads=16, seed=1)
    builtin_tokenizer().save_pretrained(path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="/tmp/ft-warm-job")
    parser.add_argument("--dataset", default="../shared/data/seed/instructions.jsonl")
    parser.add_argument("--checkpoint", help="the 7B-shaped checkpoint (default: built in DATA_DIR/models)")
    parser.add_argument("--other", help="the other base (default: built in DATA_DIR/models)")
    parser.add_argument("--cache-gib", type=float, default=5.0, help="FLASHTUNE_BASE_CACHE_GIB of the cached runs")
    parser.add_argument("--no-baseline", action="store_true", help="skip job 4 (the cache off)")
    parser.add_argument("--hyperparameters", default="{}", help="JSON merged into every job's (e.g. a short CPU check)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=".")
    return parser.parse_args()


def job_report(
    client: httpx.Client, dataset: str, model: Path, data_dir: Path, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """Post the user's job (default recipe) on ``model`` and follow it to its end; its figures."""
    body = {"dataset": dataset, "base_model": str(model), "hyperparameters": hyperparameters}
    posted, posted_at = time.perf_counter(), datetime.now(UTC)
    job: dict[str, Any] = client.post("/jobs", json=body).json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
        job = client.get(f"/jobs/{job['id']}").json()
    report: dict[str, Any] = {
        "base": model.name,
        "post_to_adapter_s": round(time.perf_counter() - posted, 2),
        "status": job["status"],
        "error": job.get("error"),
    }
    events = client.get(f"/jobs/{job['id']}/events", params={"limit": 200}).json()
    events = events.get("data", events)
    report["base_cache"] = [
        {"at_s": round(_seconds_after(posted_at, e["created_at"]), 2), "message": e["message"], **(e.get("data") or {})}
        for e in events
        if e["type"] == "base_cache"
    ]
    report["events"] = [(round(_seconds_after(posted_at, e["created_at"]), 1), e["type"], e["message"]) for e in events]
    info_path = Layout(data_dir).adapter_dir(adapter_name(job["id"])) / "training_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        report["durations"] = info["durations"]
        report["epoch_loss"] = info["losses"]["epoch_loss"]
        report["eval_loss"] = info["losses"]["eval_loss"]
        report["adapter_accuracy"] = info["metrics"].get("adapter", {}).get("accuracy")
        report["peak_gpu_memory_gib"] = info.get("peak_gpu_memory_gib")
    return report


def start_worker(env: dict[str, str], data_dir: Path, log_name: str) -> tuple[Any, float]:
    """A worker, once it has started (a fork-server worker imports torch and transformers first); its start time."""
    started = time.perf_counter()
    worker = spawn(["worker"], env, data_dir / log_name)
    while "started (database" not in (data_dir / log_name).read_text(errors="replace"):
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited; see {data_dir / log_name}")
        time.sleep(0.2)
    return worker, round(time.perf_counter() - started, 1)


def stop(proc: Any) -> None:
    proc.terminate()
    proc.wait(60)


def cache_entries(data_dir: Path) -> list[dict[str, Any]]:
    root = Layout(data_dir).base_cache
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else 0
        entry = {"name": path.name, "gib": round(size / 2**30, 3)}
        if (path / "entry.json").exists():
            entry["base"] = json.loads((path / "entry.json").read_text())["parts"]["source"]["path"]
        entries.append(entry)
    return entries


def main() -> None:
    args = parse_args()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(Layout(data_dir).base_cache, ignore_errors=True)  # job 1 must find nothing
    models = data_dir / "models"
    model = Path(args.checkpoint) if args.checkpoint else models / ("tiny-llama" if args.tiny else "deepseek-7b-shaped")
    other = Path(args.other) if args.other else models / ("tiny-llama-b" if args.tiny else "llama-1b-shaped")
    started = time.perf_counter()
    build(model, args.tiny)
    build_other(other, args.tiny)
    report: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 1), "cache_gib": args.cache_gib}
    hyperparameters = json.loads(args.hyperparameters)

    port = free_port()
    roots = sorted({str(model.resolve().parent), str(other.resolve().parent)})
    env = {
        **os.environ,
        "FLASHTUNE_DATA_DIR": str(data_dir),
        "FLASHTUNE_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "FLASHTUNE_POLL_SECONDS": "0.2",
        "FLASHTUNE_PROGRESS_INTERVAL_SECONDS": "1",
        "FLASHTUNE_ALLOWED_MODEL_ROOTS": json.dumps(roots),
        "FLASHTUNE_BASE_CACHE_GIB": str(args.cache_gib),
    }
    api = spawn(["serve", "--log-level", "warning"], env, data_dir / "api.log")
    worker = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            worker, report["worker_ready_s"] = start_worker(env, data_dir, "worker.log")
            wait_healthy(client, api)
            with open(args.dataset, "rb") as handle:
                dataset = client.post("/datasets", files={"file": handle}).json()["id"]
            jobs = report["jobs"] = {}
            for name, base in (("1_cold", model), ("2_warm", model), ("3_other_base", other)):
                jobs[name] = job_report(client, dataset, base, data_dir, hyperparameters)
                jobs[name]["cache_after"] = cache_entries(data_dir)
                print(name, jobs[name]["status"], jobs[name]["post_to_adapter_s"], "s", flush=True)
            if not args.no_baseline:
                stop(worker)
                worker, report["worker_off_ready_s"] = start_worker(
                    {**env, "FLASHTUNE_BASE_CACHE_GIB": "0"}, data_dir, "worker-off.log"
                )
                jobs["4_off"] = job_report(client, dataset, model, data_dir, hyperparameters)
                print("4_off", jobs["4_off"]["status"], jobs["4_off"]["post_to_adapter_s"], "s", flush=True)
    finally:
        for proc in (worker, api):
            if proc is not None:
                stop(proc)
    report["summary"] = summary(report["jobs"])
    if any(j["status"] != "succeeded" for j in report["jobs"].values()):
        for log_name in ("worker.log", "worker-off.log"):
            if (data_dir / log_name).exists():
                report[f"{log_name}_tail"] = (data_dir / log_name).read_text(errors="replace")[-6000:]
    text = json.dumps(report, indent=2, ensure_ascii=False, default=str)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "warm_job_gpu.json").write_text(text)


def summary(jobs: dict[str, Any]) -> dict[str, Any]:
    """POST to adapter and load seconds side by side, what the cache did, and whether the losses agree."""
    rows: dict[str, Any] = {}
    for name, job in jobs.items():
        statuses = [e.get("status") for e in job.get("base_cache", [])]
        rows[name] = {
            "post_to_adapter_s": job["post_to_adapter_s"],
            "load_s": (job.get("durations") or {}).get("load_seconds"),
            "base_cache": statuses,
        }
    same = [jobs[n].get("epoch_loss") for n in ("1_cold", "2_warm", "4_off") if n in jobs]
    rows["same_losses_cold_warm_off"] = all(loss == same[0] for loss in same) and same[0] is not None
    warm = jobs.get("2_warm", {}).get("post_to_adapter_s")
    rows["warm_under_10_s"] = warm is not None and warm < 10
    return rows


if __name__ == "__main__":
    main()
