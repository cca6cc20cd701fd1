"""What one big upload costs the API: peak memory of the ``flashtune serve`` process and ``/healthz`` latency.

On a CPU machine (docs/security.md, "Uploads and imports", has the figures):

    HF_HUB_OFFLINE=1 python -m bench.upload_memory --kind jsonl --mib 200
    HF_HUB_OFFLINE=1 python -m bench.upload_memory --kind sqlite --events 500000

It writes the file (JSON Lines of ~200-byte examples up to ``--mib``, or a database in the user's schema with
``--events`` events, each with one XAUUSD/15 return), starts a real API on loopback (no worker), resets the API
process's peak RSS (``/proc/<pid>/clear_refs``), uploads the file while another thread polls ``/healthz`` every
50 ms, and prints JSON: the status, the time, the RSS before and the peak (``VmHWM``) during the upload, and the
``/healthz`` p50/p99/max. The promise it checks: peak under 2x ``FLASHTUNE_MAX_UPLOAD_BYTES`` plus 200 MB.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

from service.datasets.sample import SCHEMA
from tests.conftest import Service

MiB = 1024 * 1024


def write_jsonl(path: Path, mib: float) -> int:
    """JSON Lines of distinct ~200-byte labelled examples, at most ``mib``; returns how many."""
    size = count = 0
    with path.open("w", encoding="utf-8") as out:
        while True:
            label = "属于利好消息" if count % 2 else "属于利空消息"
            line = json.dumps({"instruction": f"分析第{count}条快讯 " + "x" * 150, "output": label}, ensure_ascii=False)
            size += len(line.encode()) + 1
            if size > mib * MiB:
                return count
            out.write(line + "\n")
            count += 1


def write_database(path: Path, events: int) -> int:
    """The user's schema with ``events`` flash events, each with one XAUUSD/15 return."""
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA)
        conn.executemany(
            "INSERT INTO events (event_id, source, ts_utc, content, star) VALUES (?, 'flash', ?, ?, 3)",
            ((f"e{i}", f"2025-01-01T{i:09d}", f"金价快讯 {i} 美联储官员暗示可能放缓加息步伐") for i in range(events)),
        )
        conn.executemany(
            "INSERT INTO event_impacts (event_id, ticker, window_min, ret) VALUES (?, 'XAUUSD', 15, ?)",
            ((f"e{i}", ((i * 7919) % 2001 - 1000) / 1e6) for i in range(events)),
        )
        conn.commit()
    return events


def memory(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def poll_healthz(url: str, done: threading.Event, timings: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        while not done.is_set():
            started = time.perf_counter()
            client.get("/healthz")
            timings.append(time.perf_counter() - started)
            time.sleep(0.05)


def measure(svc: Service, path: Path) -> dict[str, Any]:
    assert svc.api is not None
    pid = svc.api.pid
    before = memory(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    timings: list[float] = []
    done = threading.Event()
    poller = threading.Thread(target=poll_healthz, args=(svc.url, done, timings))
    poller.start()
    started = time.perf_counter()
    with path.open("rb") as f:
        response = httpx.post(f"{svc.url}/datasets", files={"file": (path.name, f)}, timeout=3600)
    elapsed = time.perf_counter() - started
    done.set()
    poller.join()
    timings.sort()
    return {
        "status": response.status_code,
        "answer": response.text[:300],
        "seconds": round(elapsed, 1),
        "rss_before_mb": round(before / 1e6),
        "peak_mb": round(memory(pid, "VmHWM") / 1e6),
        "growth_mb": round((memory(pid, "VmHWM") - before) / 1e6),
        "healthz_ms": {
            "n": len(timings),
            "p50": round(timings[len(timings) // 2] * 1000),
            "p99": round(timings[int(len(timings) * 0.99)] * 1000),
            "max": round(timings[-1] * 1000),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("jsonl", "sqlite"), default="jsonl")
    parser.add_argument("--mib", type=float, default=200, help="size of the JSON Lines file")
    parser.add_argument("--events", type=int, default=500_000, help="events of the database")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flashtune-bench-") as tmp:
        root = Path(tmp)
        path = root / ("upload.jsonl" if args.kind == "jsonl" else "upload.db")
        rows = write_jsonl(path, args.mib) if args.kind == "jsonl" else write_database(path, args.events)
        (root / "data").mkdir()
        svc = Service(root / "data")
        svc.start_api()
        try:
            report = {"kind": args.kind, "bytes": path.stat().st_size, "rows": rows, **measure(svc, path)}
        finally:
            svc.stop()
    print(json.dumps(report, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
