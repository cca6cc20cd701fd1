"""Calibration and consistency of ``/analyze`` for the built-in recipe, through a real ``flashtune serve`` and
``flashtune worker`` on loopback (CPU is enough: the built-in model is tiny).

    HF_HUB_OFFLINE=1 python bench/calibration.py [--seeds 42,1,2] [--held-out 300] [--model-cache DIR] [--out FILE]

For each seed the script queues a built-in job through ``POST /jobs`` with the default hyperparameters (seed 42 is
the default, so that job sends none; the others send only ``seed``), waits for it, and reads what the job measured
on its own 60-item validation split (``GET /adapters/{name}``: ECE and NLL before calibration, and after it
cross-fitted) and the temperature it kept. Then it scores held-out items no job saw, neither in training nor in
calibration (built-in templates drawn with another seed, every text distinct from the built-in train and validation
texts), through ``POST /analyze/batch`` (label only), and computes accuracy, NLL, Brier score and ECE (top label, 10
equal-width bins) of the probabilities served (calibrated where the job kept a temperature) and of the raw ones. The
raw probabilities are recovered from the served ones (``p ** T``, normalised: temperature scaling divides the
log-likelihoods by ``T``), exact up to the response's six decimals.

Last, consistency on 100 held-out items with the base model alone and the first job's adapter: the share of
analyses whose text states the scored label, importance and reaction (``service.llm.prompts.parse_response``), in
the default mode (the text continues the scored prefix) and with ``"generation": "free"``, and what ``consistent``
said.

``--model-cache DIR``: a folder holding ``models/builtin-v1`` (the tests' ``FLASHTUNE_TEST_MODEL_CACHE``), copied
into the temporary DATA_DIR instead of building the model (~25 s on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.analyze import free_port, spawn, wait_healthy
from service.llm import calibration
from service.llm.builtin.data import builtin_dataset, generate
from service.llm.prompts import LABELS, Example, Stated, parse_response

HELD_OUT_SEED = 4242
CHUNK = 50  # items per /analyze/batch (FLASHTUNE_MAX_BATCH_ITEMS is 64)
CONSISTENCY_ITEMS = 100


def held_out(count: int) -> list[Example]:
    """``count`` labelled built-in items whose texts are in neither the built-in training nor validation split."""
    train, validation = builtin_dataset()
    seen = {e.input for e in train + validation}
    items = []
    for example in generate(20 * count, seed=HELD_OUT_SEED):
        if example.input not in seen and example.label is not None:
            seen.add(example.input)
            items.append(example)
    if len(items) < count:
        raise SystemExit(f"only {len(items)} distinct held-out items; ask for fewer")
    return items[:count]


def train_jobs(client: httpx.Client, seeds: list[int]) -> list[dict[str, Any]]:
    """One built-in job per seed with the defaults (seed 42 sends no hyperparameters at all); the finished jobs."""
    jobs = []
    for seed in seeds:
        body: dict[str, Any] = {"dataset": "builtin"}
        if seed != 42:
            body["hyperparameters"] = {"seed": seed}
        response = client.post("/jobs", json=body)
        response.raise_for_status()
        jobs.append(response.json())
    finished = []
    for job in jobs:
        started = time.monotonic()
        while job["status"] in ("queued", "running"):
            time.sleep(1)
            job = client.get(f"/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} ended {job['status']}: {job.get('error')}")
        print(f"job {job['id']} succeeded ({time.monotonic() - started:.0f} s after the previous one)", flush=True)
        finished.append(job)
    return finished


def analyze(client: httpx.Client, adapter: str, texts: list[str], **extra: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(texts), CHUNK):
        body = {"items": texts[start : start + CHUNK], "adapter": adapter, **extra}
        response = client.post("/analyze/batch", json=body)
        if response.status_code != 200:
            raise SystemExit(f"/analyze/batch answered {response.status_code}: {response.text[:300]}")
        out += response.json()["data"]
    return out


def raw_probs(result: dict[str, Any]) -> list[float]:
    """The uncalibrated probabilities behind a served result: ``p ** T`` normalised (``p`` where none was applied)."""
    probs = [float(result["probs"][label]) for label in LABELS]
    temperature = result.get("temperature") or 1.0
    powered = [p**temperature for p in probs]
    total = sum(powered)
    return [p / total for p in powered]


def figures(probs: list[list[float]], gold: list[int]) -> dict[str, float]:
    right = sum(max(range(len(row)), key=row.__getitem__) == g for row, g in zip(probs, gold, strict=True))
    return {
        "accuracy": round(right / len(gold), 4),
        "nll": round(calibration.nll(probs, gold), 4),
        "brier": round(calibration.brier(probs, gold), 4),
        "ece": round(calibration.ece(probs, gold), 4),
    }


def measure_job(client: httpx.Client, job: dict[str, Any], items: list[Example]) -> dict[str, Any]:
    """What the job measured on its validation split, and the held-out figures before and after calibration."""
    name = job["adapter"]
    metrics = client.get(f"/adapters/{name}").json()["metrics"]
    adapter, fitted = metrics["adapter"], metrics.get("calibration", {})
    results = analyze(client, name, [e.input for e in items], max_new_tokens=0)
    gold = [LABELS.index(e.label) for e in items if e.label is not None]
    served = [[float(r["probs"][label]) for label in LABELS] for r in results]
    return {
        "job": job["id"],
        "seed": job["hyperparameters"]["seed"],
        "temperature": fitted.get("temperature"),
        "applied": fitted.get("applied"),
        "calibrated_responses": sum(bool(r["calibrated"]) for r in results),
        "validation": {
            "items": metrics["num_labelled"],
            "accuracy": adapter["accuracy"],
            "before": {k: adapter[k] for k in ("nll", "brier", "ece")},
            "after_cross_fitted": {k: adapter["calibrated"][k] for k in ("nll", "brier", "ece")},
        },
        "held_out": {
            "items": len(items),
            "before": figures([raw_probs(r) for r in results], gold),
            "after": figures(served, gold),
        },
    }


def stated_as_scored(result: dict[str, Any]) -> bool:
    return parse_response(result["analysis"]) == Stated(
        result["label"], result["importance"], result["market_reaction"]
    )


def consistency(client: httpx.Client, adapter: str, items: list[Example]) -> list[dict[str, Any]]:
    """Per model and generation mode: texts that state the scored label, and what ``consistent`` said."""
    texts = [e.input for e in items[:CONSISTENCY_ITEMS]]
    rows = []
    for who in ("none", adapter):
        for mode in ("prefix", "free"):
            results = analyze(client, who, texts, generation=mode, max_new_tokens=48)
            rows.append(
                {
                    "model": "base" if who == "none" else who,
                    "generation": mode,
                    "items": len(results),
                    "text_states_the_label": sum(map(stated_as_scored, results)),
                    "consistent_false": sum(r["consistent"] is False for r in results),
                }
            )
    return rows


def report(jobs: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    head = f"{'job':>4} {'seed':>5} {'T':>6} {'kept':>5}"
    print(f"\n{head} | validation (cross-fitted) ECE, NLL | held-out accuracy, ECE, NLL")
    for j in jobs:
        v, h = j["validation"], j["held_out"]
        print(
            f"{j['job']:>4} {j['seed']:>5} {j['temperature']:>6} {j['applied']!s:>5} | "
            f"{v['before']['ece']:.3f} -> {v['after_cross_fitted']['ece']:.3f}, "
            f"{v['before']['nll']:.3f} -> {v['after_cross_fitted']['nll']:.3f} | "
            f"{h['before']['accuracy']:.3f} -> {h['after']['accuracy']:.3f}, "
            f"{h['before']['ece']:.3f} -> {h['after']['ece']:.3f}, {h['before']['nll']:.3f} -> {h['after']['nll']:.3f}"
        )
    for c in checks:
        print(
            f"{c['model']:>6} {c['generation']:>6}: {c['text_states_the_label']}/{c['items']} texts state the scored "
            f"label, importance and reaction; consistent false: {c['consistent_false']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,1,2", help="one default built-in job per seed (default 42,1,2)")
    parser.add_argument("--held-out", type=int, default=300, help="held-out items scored per job (default 300)")
    parser.add_argument("--model-cache", type=Path, help="a folder holding models/builtin-v1 to copy in")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="flashtune-calibration-"))
    if args.model_cache:
        shutil.copytree(args.model_cache / "models", data_dir / "models", ignore=shutil.ignore_patterns("*.lock"))
    port = free_port()
    env = {**os.environ, "FLASHTUNE_DATA_DIR": str(data_dir), "FLASHTUNE_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    api = spawn(["serve", "--log-level", "warning"], env, data_dir / "api.log")
    worker = spawn(["worker"], env, data_dir / "worker.log")
    started = time.monotonic()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1800) as client:
            wait_healthy(client, api, seconds=300)
            jobs = train_jobs(client, [int(s) for s in args.seeds.split(",")])
            items = held_out(args.held_out)
            measured = [measure_job(client, job, items) for job in jobs]
            checks = consistency(client, jobs[0]["adapter"], items)
    finally:
        for proc in (worker, api):
            proc.terminate()
            proc.wait(60)
        shutil.rmtree(data_dir, ignore_errors=True)
    report(measured, checks)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s in all")
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jobs": measured, "consistency": checks}
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
