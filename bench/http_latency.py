"""Label-only ``POST /analyze`` over HTTP against a real ``flashtune serve``, and the same requests in process.

    # CPU, the built-in model (a smoke test; figures are noisy on a small shared machine):
    HF_HUB_OFFLINE=1 python bench/http_latency.py --tiny --out /tmp/http-latency
    # CPU, what a request costs besides the model (servers without a model), this tree against an earlier one:
    HF_HUB_OFFLINE=1 python bench/http_latency.py --tiny --stub-model --baseline /tmp/old --rounds 2 --out /tmp/x
    # GPU, the 7B shape (NF4 base, one random q/v r 8 adapter attached), this tree against an earlier one:
    git archive <rev> | (rm -rf .baseline && mkdir .baseline && tar -x -C .baseline)
    export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 bench/http_latency.py --checkpoint /tmp/ft-fp16/models/deepseek-7b-shaped --baseline .baseline --out $OUT

A DATA_DIR is made with the base (``--tiny``: the built-in model; else ``--checkpoint``, built by
``bench/job_api_gpu.build`` where missing) and one random LoRA adapter (``bench/analyze_gpu.make_adapters``,
registered as the adapter of a succeeded job, as a trained one would be). Then, in this order:

  in process   a ``ModelServer`` on the same settings: ``analyze`` of one text called directly (no batcher), and
               ``submit`` (the micro-batcher, as the API calls it) at concurrency 1 and from 64 threads, and the
               sweep below
  HTTP         ``flashtune serve`` from ``--baseline`` (a source tree of an earlier revision, if given), from this
               tree, and with ``--site DIR`` this tree again with DIR first on its path (uvloop, httptools), one
               after the other (``--rounds``: that many times, alternating; figures are the medians), on the same
               DATA_DIR and settings; a keep-alive asyncio client with one connection per concurrent request (raw
               HTTP/1.1, so the client costs little); ``GET /healthz`` (the fixed cost of a request) and label-only
               ``/analyze`` with the adapter. ``overhead``: a request's latency less the model thread's time for
               its micro-batch (``latency_ms`` of the answer): the way between the socket and the model thread.
               ``--stub-model`` replaces the model's pass by a constant answer in the servers (STUB_SERVE), so
               that what is measured is that way alone

After start-up (two requests that load the base and the adapter, then, where the server says so in ``/readyz``,
until its warm-up is done) each server gets: concurrency 1 (p50/p99), 64 (requests/s), then a sweep 1, 2, 4, 8,
16, 32, 64, 3, 24, 1 (p50 and p99 at each level: a request that pays a CUDA-graph capture shows in the p99). The
figures, the ratios (HTTP against in process, each tree against the baseline) and the goals of issue 23 (p50 at
concurrency 1 < 25 ms over HTTP; requests/s at 64 >= 0.8x in process; p99 < 2x p50 at every level) are printed and
written to ``--out``/http_latency.json, the servers' logs to ``--out``/serve.log. ``--tiny`` runs one torch
thread per process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.analyze import free_port  # noqa: E402

SWEEP = (1, 2, 4, 8, 16, 32, 64, 3, 24, 1)
ADAPTER = "job-1"
# --stub-model: the served engine answers at once, without a model (``ModelServer._serve`` replaced in the server
# process, which then never loads the base): what is left of a request's time is the way to and from the model thread
STUB_SERVE = """
import sys
from service.llm.prompts import REACTION_WORDS
from service.llm.scoring import Prediction
from service.serving import engine

def _serve(self, items, new_tokens):
    probs = {"bearish": 0.2, "neutral": 0.6, "bullish": 0.2}
    p = Prediction("neutral", probs, 3, REACTION_WORDS["neutral"], (-1.6, -0.5, -1.6))
    return [engine._Served(p, "", len(items)) for _ in items]

engine.ModelServer._serve = _serve
from service.cli import main
main(sys.argv[1:])
"""


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies_ms: list[float], wall_s: float) -> dict[str, Any]:
    return {
        "requests": len(latencies_ms),
        "p50_ms": round(statistics.median(latencies_ms), 2),
        "p99_ms": round(percentile(latencies_ms, 0.99), 2),
        "max_ms": round(max(latencies_ms), 2),
        "requests_per_s": round(len(latencies_ms) / wall_s, 2),
    }


def texts(count: int) -> list[str]:
    from service.llm.builtin.data import generate

    return [e.input for e in generate(count, seed=7, labels="rule")]


# --------------------------------------------------------------------------------------------------- set-up
def prepare(data_dir: Path, tiny: bool, checkpoint: Path) -> str:
    """The base model's folder, and adapter ADAPTER in DATA_DIR as the adapter of succeeded job 1."""
    from sqlmodel import Session

    from bench.analyze_gpu import make_adapters
    from service.core.config import Settings
    from service.jobs.db import init_db, make_engine
    from service.jobs.models import Job, JobStatus

    if tiny:
        from service.llm.builtin.model import ensure_builtin_model

        cache = os.environ.get("FLASHTUNE_TEST_MODEL_CACHE")
        base = ensure_builtin_model(Path(cache) if cache else data_dir / "builtin-cache")
    else:
        base = checkpoint
        if not (base / "config.json").exists():
            from bench.job_api_gpu import build

            log(f"building the 7B-shaped checkpoint at {base} ...")
            build(base, False)
    settings = Settings(data_dir=data_dir, base_model=str(base))
    settings.ensure_dirs()
    (ref,) = make_adapters(base, settings.layout.adapters, 1)
    assert ref.name == ADAPTER, ref.name
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    with Session(engine) as session:
        session.add(
            Job(status=JobStatus.succeeded, base_model=str(base), dataset="bench", hyperparameters={}, adapter=ADAPTER)
        )
        session.commit()
    engine.dispose()
    return str(base)


# ---------------------------------------------------------------------------------------------- in process
def in_process(
    env: dict[str, str], items: list[str], requests: int, per_thread: int, sweep: list[int], floor: int
) -> dict[str, Any]:
    """The same label-only requests through ModelServer: ``analyze`` directly, and ``submit`` (the batcher)."""
    import torch

    from service.core.config import Settings
    from service.serving.engine import ModelServer

    for key, value in env.items():
        if key.startswith("FLASHTUNE_"):
            os.environ[key] = value
    settings = Settings()
    server = ModelServer(settings)
    adapter = settings.layout.adapter(ADAPTER)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for text in items[:3]:
        server.submit(text, adapter, 0)
    wait_warm(lambda: getattr(server, "warming", False))
    out: dict[str, Any] = {}

    def timed(call: Callable[[int], Any], count: int) -> list[float]:
        latencies = []
        for i in range(count):
            started = time.perf_counter()
            call(i)
            sync()
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    started = time.perf_counter()
    direct = timed(lambda i: server.analyze([items[i % len(items)]], adapter, 0), requests)
    out["direct_c1"] = summary(direct, time.perf_counter() - started)
    started = time.perf_counter()
    batched = timed(lambda i: server.submit(items[i % len(items)], adapter, 0), requests)
    out["submit_c1"] = summary(batched, time.perf_counter() - started)
    out["submit_c64"] = threads_level(server, adapter, items, 64, 64 * per_thread)
    out["sweep"] = [threads_level(server, adapter, items, c, max(2 * c, floor)) for c in sweep]
    out["warming_seen"] = hasattr(server, "warming")
    server.release()
    return out


def threads_level(server: Any, adapter: Any, items: list[str], concurrency: int, requests: int) -> dict[str, Any]:
    lock, counter, latencies = threading.Lock(), [0], []

    def worker() -> None:
        while True:
            with lock:
                i = counter[0]
                counter[0] += 1
            if i >= requests:
                return
            started = time.perf_counter()
            server.submit(items[i % len(items)], adapter, 0)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    figures = {"concurrency": concurrency, **summary(latencies, time.perf_counter() - started)}
    log(f"  submit() {figures}")
    return figures


def wait_warm(warming: Callable[[], bool], seconds: float = 300) -> float:
    started = time.monotonic()
    while warming() and time.monotonic() - started < seconds:
        time.sleep(0.2)
    return round(time.monotonic() - started, 2)


# -------------------------------------------------------------------------------------------------- HTTP
class Connection:
    """One keep-alive HTTP/1.1 connection; requests and responses with a Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux /proc), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def http_level(
    port: int, bodies: list[bytes], concurrency: int, requests: int, path: str, pid: int | None = None
) -> dict[str, Any]:
    """``requests`` requests from ``concurrency`` connections; with ``pid`` (the server), also the server's CPU time
    per request: what a request costs the server, whatever else the machine runs."""
    connections = [await Connection.open(port) for _ in range(concurrency)]
    cpu_before = cpu_seconds(pid)
    counter, latencies, model = [0], [], []

    async def worker(conn: Connection) -> None:
        while counter[0] < requests:
            i = counter[0]
            counter[0] += 1
            started = time.perf_counter()
            status, payload = await conn.request(
                "POST" if bodies else "GET", path, bodies[i % len(bodies)] if bodies else b""
            )
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}: {payload[:300]!r}")
            if bodies:  # the model thread's time for the micro-batch that served it, as the response says
                model.append(float(json.loads(payload)["latency_ms"]))

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - started
    for conn in connections:
        conn.close()
    figures = {"concurrency": concurrency, **summary(latencies, wall)}
    cpu_after = cpu_seconds(pid)
    if cpu_before is not None and cpu_after is not None:
        figures["server_cpu_ms_per_request"] = round((cpu_after - cpu_before) * 1000 / len(latencies), 2)
    if model:
        figures["model_p50_ms"] = round(statistics.median(model), 2)
        figures["overhead_p50_ms"] = round(statistics.median(a - b for a, b in zip(latencies, model, strict=True)), 2)
    log(f"  {path} {figures}")
    return figures


def over_http(
    name: str,
    tree: Path,
    site: Path | None,
    env: dict[str, str],
    out: Path,
    items: list[str],
    requests: int,
    per_thread: int,
    sweep: list[int],
    floor: int,
    stub: bool,
) -> dict[str, Any]:
    """One ``flashtune serve`` from source tree ``tree`` (``site``: a folder of packages put first on its path;
    ``stub``: with STUB_SERVE): start-up, then every measurement."""
    import httpx

    port = free_port()
    path = [str(site)] if site else []
    env = {
        **env,
        "FLASHTUNE_PORT": str(port),
        "PYTHONPATH": os.pathsep.join([*path, str(tree), env.get("PYTHONPATH", "")]),
    }
    handle = (out / "serve.log").open("ab")
    handle.write(f"==== {name}: {tree}{f' with {site}' if site else ''}\n".encode())
    handle.flush()
    started = time.monotonic()
    start = ["-c", STUB_SERVE] if stub else ["-m", "service.cli"]
    proc = subprocess.Popen(
        [sys.executable, *start, "serve", "--log-level", "warning"],
        cwd=tree,
        env=env,
        stdout=handle,
        stderr=handle,
    )
    bodies = [json.dumps({"text": t, "adapter": ADAPTER, "max_new_tokens": 0}).encode() for t in items]
    result: dict[str, Any] = {"tree": str(tree), "site": str(site) if site else None}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{name}: the API exited during start-up; see serve.log")
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            result["up_s"] = round(time.monotonic() - started, 2)
            for body in bodies[:2]:  # the base and the adapter load
                response = client.post("/analyze", content=body, headers={"content-type": "application/json"})
                response.raise_for_status()
            result["first_requests_s"] = round(time.monotonic() - started - result["up_s"], 2)
            readyz = client.get("/readyz").json()
            result["readyz_after_first"] = readyz
            result["warm_wait_s"] = wait_warm(lambda: bool(client.get("/readyz").json().get("warming", False)))

        async def measure() -> None:
            pid = proc.pid
            result["healthz_c1"] = await http_level(port, [], 1, requests, "/healthz", pid)
            result["c1"] = await http_level(port, bodies, 1, requests, "/analyze", pid)
            result["c64"] = await http_level(port, bodies, 64, 64 * per_thread, "/analyze", pid)
            result["sweep"] = [await http_level(port, bodies, c, max(2 * c, floor), "/analyze", pid) for c in sweep]

        asyncio.run(measure())
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        handle.close()
    return result


# ----------------------------------------------------------------------------------------------- report
def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several serves of one variant: the median of each figure across them (the runs kept under ``rounds``)."""
    if len(runs) == 1:
        return runs[0]

    def med(figures: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            k: (round(statistics.median(f[k] for f in figures), 2) if isinstance(v, float) else v)
            for k, v in figures[0].items()
        }

    out: dict[str, Any] = {key: med([r[key] for r in runs]) for key in ("healthz_c1", "c1", "c64")}
    out["sweep"] = [med([r["sweep"][i] for r in runs]) for i in range(len(runs[0]["sweep"]))]
    return {**out, "rounds": runs}


def worst_tail(sweep: list[dict[str, Any]]) -> float:
    return round(max(level["p99_ms"] / level["p50_ms"] for level in sweep), 2)


def report(results: dict[str, Any]) -> dict[str, Any]:
    """Print the figures and return the ratios (HTTP against in process where measured, this tree against the
    baseline) and the goals of issue 23."""
    inproc = results.get("in_process")
    ratios: dict[str, Any] = {}
    head = f"{'':<24} {'c1 p50':>8} {'c1 p99':>8} {'overhead':>9} {'c64 req/s':>10} {'p99/p50':>8} {'healthz':>8}"
    head += f" {'cpu c1':>7} {'cpu c64':>8}"
    print("\n" + head)
    print("(overhead: c1 p50 of latency less the model's time for the batch; cpu: server CPU ms per request)")
    rows: list[tuple[str, dict[str, Any], Any, Any, Any]] = []
    if inproc:
        rows.append(("in process, analyze()", inproc["direct_c1"], None, None, None))
        rows.append(("in process, submit()", inproc["submit_c1"], inproc["submit_c64"], inproc["sweep"], None))
    for name, http in results["http"].items():
        rows.append((f"HTTP, {name}", http["c1"], http["c64"], http["sweep"], http["healthz_c1"]))
    for label, c1, c64, sweep, healthz in rows:
        print(
            f"{label:<24} {c1['p50_ms']:>8} {c1['p99_ms']:>8} {c1.get('overhead_p50_ms', ''):>9} "
            f"{c64['requests_per_s'] if c64 else '':>10} {worst_tail(sweep) if sweep else '':>8} "
            f"{healthz['p50_ms'] if healthz else '':>8} {c1.get('server_cpu_ms_per_request', ''):>7} "
            f"{c64.get('server_cpu_ms_per_request', '') if c64 else '':>8}"
        )
    for name, http in results["http"].items():
        ratios[name] = {"worst_sweep_p99_over_p50": worst_tail(http["sweep"])}
        if inproc:
            direct, c64 = inproc["direct_c1"]["p50_ms"], inproc["submit_c64"]["requests_per_s"]
            ratios[name]["c1_p50_http_over_in_process_direct"] = round(http["c1"]["p50_ms"] / direct, 3)
            ratios[name]["c1_p50_http_minus_in_process_direct_ms"] = round(http["c1"]["p50_ms"] - direct, 2)
            ratios[name]["c64_http_over_in_process"] = round(http["c64"]["requests_per_s"] / c64, 3)
    old = results["http"].get("baseline")
    for name, new in results["http"].items():
        if old is not None and name != "baseline":
            ratios[name]["over_baseline"] = {
                "c1_p50": round(new["c1"]["p50_ms"] / old["c1"]["p50_ms"], 3),
                "c64_requests_per_s": round(new["c64"]["requests_per_s"] / old["c64"]["requests_per_s"], 3),
            }
    tree = results["http"].get("tree")
    if tree is not None and inproc:
        ratios["goals"] = {
            "http_c1_p50_under_25_ms": tree["c1"]["p50_ms"] < 25,
            "http_c64_at_least_0.8x_in_process": ratios["tree"]["c64_http_over_in_process"] >= 0.8,
            "p99_under_2x_p50_every_level": ratios["tree"]["worst_sweep_p99_over_p50"] < 2,
        }
    print("\nsweep (concurrency: p50 / p99 ms):")
    sweeps = [("in process", inproc["sweep"])] if inproc else []
    for label, sweep in sweeps + [(n, h["sweep"]) for n, h in results["http"].items()]:
        print(f"  {label:<12}", "  ".join(f"{s['concurrency']}: {s['p50_ms']}/{s['p99_ms']}" for s in sweep))
    print(json.dumps(ratios, indent=2))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the built-in model on the CPU")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/ft-fp16/models/deepseek-7b-shaped"))
    parser.add_argument("--baseline", type=Path, help="a source tree of an earlier revision to serve too")
    parser.add_argument("--requests", type=int, default=0, help="requests at concurrency 1 (default 60, tiny 20)")
    parser.add_argument("--per-thread", type=int, default=0, help="requests per connection at 64 (default 6, tiny 2)")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument(
        "--site", type=Path, help="also serve this tree with this folder first on PYTHONPATH (uvloop...)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="serve each tree this many times, alternating")
    parser.add_argument("--sweep", default="", help="concurrency levels, comma-separated (default: SWEEP)")
    parser.add_argument("--stub-model", action="store_true", help="servers answer without a model (see STUB_SERVE)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    requests = args.requests or (20 if args.tiny else 60)
    per_thread = args.per_thread or (2 if args.tiny else 6)
    sweep = [int(c) for c in args.sweep.split(",")] if args.sweep else list(SWEEP)
    floor = 8 if args.tiny else 24  # requests at least at each level of the sweep
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="flashtune-http-"))
    try:
        base = prepare(data_dir, args.tiny, args.checkpoint)
        env = {
            **os.environ,
            "FLASHTUNE_DATA_DIR": str(data_dir),
            "FLASHTUNE_BASE_MODEL": base,
            "FLASHTUNE_DEVICE": "cpu" if args.tiny else "auto",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if args.tiny:  # one torch thread per process: on a small shared machine, OpenMP's barriers between busy
            # processes cost more than the second thread gives (a server measured 10-20x slower than in process)
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            import torch

            torch.set_num_threads(1)
        items = texts(64)
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "base": base,
            "adapter": "random LoRA q/v r 8",
            "sweep_levels": sweep,
        }
        try:
            import torch

            if torch.cuda.is_available() and not args.tiny:
                results["device"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass
        if not args.skip_in_process and not args.stub_model:
            log("in process ...")
            results["in_process"] = in_process(env, items, requests, per_thread, sweep, floor)
        results["http"] = {}
        variants: list[tuple[str, Path, Path | None]] = (
            [("baseline", args.baseline.resolve(), None)] if args.baseline else []
        )
        variants.append(("tree", ROOT, None))
        if args.site:
            variants.append(("tree+site", ROOT, args.site.resolve()))
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
        for round_ in range(args.rounds):
            for name, tree, site in variants:
                log(f"over HTTP, {name} ({tree}), round {round_ + 1} ...")
                rounds[name].append(
                    over_http(
                        name, tree, site, env, args.out, items, requests, per_thread, sweep, floor, args.stub_model
                    )
                )
        results["http"] = {name: merged(runs) for name, runs in rounds.items()}
        results["ratios"] = report(results)
        (args.out / "http_latency.json").write_text(json.dumps(results, indent=2))
        log(f"wrote {args.out / 'http_latency.json'}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
