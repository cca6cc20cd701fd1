"""CPU benchmark of ``POST /analyze`` through a real ``flashtune serve`` on the built-in model with a trained adapter.

    HF_HUB_OFFLINE=1 python bench/analyze.py [--data-dir DIR] [--out results.json]

With ``--data-dir`` pointing at a DATA_DIR that already holds a succeeded adapter (``flashtune demo --data-dir DIR``
leaves one), that adapter is used; otherwise a temporary DATA_DIR is made, a ``flashtune worker`` trains one
built-in job (1 epoch: the adapter's accuracy does not matter here, its shape does), and the worker is stopped
before measuring. Then only the API process runs and the script sends /analyze requests at concurrency 1, 8 and
32, label-only (``max_new_tokens: 0``) and with a 64-token analysis, and prints client-side p50/p95 latency and
requests/s. The server has no micro-batching yet: requests are served one at a time under the model lock, so
requests/s should stay flat with concurrency while latency grows with the queue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

CONCURRENCY = (1, 8, 32)
MODES = (("label-only", 0), ("analysis-64", 64))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env, stdout=handle, stderr=handle)


def wait_healthy(client: httpx.Client, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the API exited during start-up; see api.log in the DATA_DIR")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("the API did not come up")


def ensure_adapter(client: httpx.Client, env: dict[str, str], data_dir: Path) -> str:
    """The newest succeeded adapter, training a 1-epoch built-in job through a real worker if there is none."""
    jobs = client.get("/jobs", params={"status": "succeeded"}).json()
    items = jobs.get("data", []) if isinstance(jobs, dict) else jobs
    done = [j for j in items if j.get("adapter")]
    if done:
        return str(done[0]["adapter"])
    worker = spawn(["worker"], env, data_dir / "worker.log")
    try:
        job = client.post("/jobs", json={"dataset": "builtin", "hyperparameters": {"epochs": 1}}).json()
        print(f"training job {job['id']} (built-in, 1 epoch) for an adapter ...", flush=True)
        while job["status"] in ("queued", "running"):
            time.sleep(1)
            job = client.get(f"/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise SystemExit(f"job ended {job['status']}: {job.get('error')}")
        return str(job["adapter"])
    finally:
        worker.terminate()
        worker.wait(60)


def texts(count: int) -> list[str]:
    from service.llm.builtin.data import generate

    return [e.input for e in generate(count, seed=7, labels="rule")]


def run_level(
    client: httpx.Client, items: list[str], adapter: str, new_tokens: int, concurrency: int, requests: int
) -> dict[str, Any]:
    def one(i: int) -> float:
        body = {"text": items[i % len(items)], "adapter": adapter, "max_new_tokens": new_tokens}
        started = time.perf_counter()
        response = client.post("/analyze", json=body)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"/analyze answered {response.status_code}: {response.text[:300]}")
        return elapsed * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "max_new_tokens": new_tokens,
        "requests": requests,
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1),
        "requests_per_s": round(requests / wall, 2),
    }


def measure(
    env: dict[str, str], data_dir: Path, port: int, requests_per_level: int, batching: bool
) -> list[dict[str, Any]]:
    """One server run: every mode at every concurrency. ``batching=False`` sets FLASHTUNE_BATCH_MAX_SIZE=1."""
    env = {**env, "FLASHTUNE_BATCH_MAX_SIZE": "32" if batching else "1"}
    api = spawn(["serve", "--log-level", "warning"], env, data_dir / "api.log")
    results: list[dict[str, Any]] = []
    label = "on" if batching else "off"
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=600, limits=httpx.Limits(max_connections=64)
        ) as client:
            wait_healthy(client, api)
            adapter = ensure_adapter(client, env, data_dir)
            items = texts(64)
            for new_tokens in (0, 64):  # warm-up: load the base, attach the adapter, first generate
                run_level(client, items, adapter, new_tokens, 1, 2)
            print(f"micro-batching {label}; adapter {adapter}; {platform.machine()} with {os.cpu_count()} CPUs")
            print(f"{'mode':<12} {'conc':>4} {'reqs':>5} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7}")
            for mode, new_tokens in MODES:
                for concurrency in CONCURRENCY:
                    requests = requests_per_level or max(16, 2 * concurrency)
                    row = {
                        "mode": mode,
                        "batching": batching,
                        **run_level(client, items, adapter, new_tokens, concurrency, requests),
                    }
                    results.append(row)
                    print(
                        f"{mode:<12} {concurrency:>4} {requests:>5} {row['p50_ms']:>8} {row['p95_ms']:>8} "
                        f"{row['requests_per_s']:>7}",
                        flush=True,
                    )
    finally:
        api.terminate()
        api.wait(60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="a DATA_DIR to reuse (default: a new temporary one)")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: max(16, 2 x conc))")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="flashtune-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "FLASHTUNE_DATA_DIR": str(data_dir),
        "FLASHTUNE_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    try:
        on = measure(env, data_dir, port, args.requests, batching=True)
        off = measure(env, data_dir, port, args.requests, batching=False)
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    print("requests/s with micro-batching on / off, same machine, same run:")
    for a, b in zip(on, off, strict=True):
        ratio = a["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("nan")
        print(f"  {a['mode']:<12} concurrency {a['concurrency']:>2}: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": on + off}, indent=2))


if __name__ == "__main__":
    main()
