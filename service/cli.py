"""``flashtune serve | worker | demo | sample-data``, and the client commands ``jobs | datasets | analyze``
(cli_client)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.cli_client import add_commands
from service.core import logs
from service.core.config import Settings, warn_unknown_env
from service.datasets.sample import DEFAULT_SEED, write_sample_data

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("data_dir", "database_url", "base_model", "device", "host", "port", "gpus", "gpu", "gpu_memory_gib"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "log_json", False):
        overrides["log_json"] = True
    settings = Settings(**overrides)
    if settings.log_json:
        logs.configure(json_lines=True)
    warn_unknown_env(os.environ)  # a mistyped FLASHTUNE_* name would be ignored without a word
    return settings


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.api.main import create_app

    settings = _settings(args)
    if settings.api_key_file is not None:
        from service.api.security import ApiKeyConfigError, api_keys

        try:
            api_keys(settings)
        except ApiKeyConfigError as exc:
            sys.exit(str(exc))
    if not settings.auth_enabled:
        if settings.host not in LOOPBACK and not args.allow_public:
            sys.exit(
                f"refusing to listen on {settings.host} without FLASHTUNE_API_KEY; set a key or pass --allow-public"
            )
        logging.getLogger("flashtune").warning("no FLASHTUNE_API_KEY set: the API is open to anyone who can reach it")
    # JSON lines: log_config=None keeps the set-up of logs.configure instead of uvicorn's own formatters
    logging_options: dict[str, Any] = {"log_config": None} if settings.log_json else {}
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level, **logging_options
    )


def worker(args: argparse.Namespace) -> None:
    from workers.worker import Worker

    Worker(_settings(args)).run(max_jobs=args.max_jobs)


# ---------------------------------------------------------------------------------------------------- demo
DEMO_NEWS = [
    "美联储宣布加息25个基点",
    "欧洲央行宣布降息50个基点",
    "中国人民银行召开例行新闻发布会",
    "突发：英国央行宣布增持黄金储备20吨",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(client: Any, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except Exception:
            time.sleep(0.3)
    raise SystemExit("the API did not come up")


def demo(args: argparse.Namespace) -> None:
    import httpx

    from service.cli_client import progress_line

    data_dir = args.data_dir or os.environ.get("FLASHTUNE_DATA_DIR") or tempfile.mkdtemp(prefix="flashtune-demo-")
    port = _free_port()
    env = {**os.environ, "FLASHTUNE_DATA_DIR": str(data_dir), "FLASHTUNE_PORT": str(port)}
    print(f"FlashTune demo: data in {data_dir}, API on http://127.0.0.1:{port}")
    procs = [
        subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], env=env),
        subprocess.Popen([sys.executable, "-m", "workers"], env=env),
    ]
    started = time.monotonic()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            _wait_healthy(client)
            job = client.post("/jobs", json={"dataset": "builtin"}).json()
            print(f"queued job {job['id']} (the built-in model is built on first use, then trained)")
            while job["status"] in ("queued", "running"):
                time.sleep(0.5)
                job = client.get(f"/jobs/{job['id']}").json()
                print("\r" + progress_line(job), end="", flush=True)
            print()
            if job["status"] != "succeeded":
                raise SystemExit(f"job ended {job['status']}: {job['error']}")
            print(f"job succeeded in {time.monotonic() - started:.0f} s; adapter {job['adapter']}\n")
            for text in DEMO_NEWS:
                before = client.post("/analyze", json={"text": text, "adapter": "none", "max_new_tokens": 0}).json()
                after = client.post("/analyze", json={"text": text, "adapter": job["adapter"]}).json()
                print(f"news: {text}")
                print(f"  base model : {before['label']:<8} p={before['score']:.2f}")
                print(f"  fine-tuned : {after['label']:<8} p={after['score']:.2f}  {after['analysis']}")
            metrics = client.get(f"/adapters/{job['adapter']}").json()["metrics"]
            if metrics.get("adapter"):
                print(
                    f"\nheld-out accuracy: base {metrics['base']['accuracy']:.2f} -> adapter "
                    f"{metrics['adapter']['accuracy']:.2f} ({metrics['num_labelled']} items)"
                )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def sample_data(args: argparse.Namespace) -> None:
    """Write sample files in the user's formats, to try the importers without data of one's own."""
    for path in write_sample_data(Path(args.dir), seed=args.seed).files():
        print(path)


# ---------------------------------------------------------------------------------------------------- main
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", dest="data_dir", help="FLASHTUNE_DATA_DIR")
    parser.add_argument("--database-url", dest="database_url", help="FLASHTUNE_DATABASE_URL")
    parser.add_argument("--base-model", dest="base_model", help="FLASHTUNE_BASE_MODEL")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="FLASHTUNE_DEVICE")
    parser.add_argument(
        "--log-json",
        dest="log_json",
        action="store_true",
        default=None,
        help="FLASHTUNE_LOG_JSON: one JSON object per log line",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flashtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="start the API")
    _common(p_serve)
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--allow-public", action="store_true", help="listen beyond loopback without an API key")
    p_serve.add_argument("--log-level", default="info")
    p_serve.set_defaults(func=serve)
    p_worker = sub.add_parser("worker", help="start a worker that trains queued jobs")
    _common(p_worker)
    p_worker.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    p_worker.add_argument(
        "--gpus",
        help="FLASHTUNE_GPUS: GPUs one job trains on, a number or 'all' (torchrun, "
        "data parallel); on CPU, N gloo processes",
    )
    p_worker.add_argument(
        "--gpu",
        help="FLASHTUNE_GPU: the GPU(s) this worker's jobs may use (CUDA_VISIBLE_DEVICES), "
        "e.g. 0; run one worker per GPU with --gpu 0, --gpu 1, ...",
    )
    p_worker.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="FLASHTUNE_GPU_MEMORY_GIB: GPU memory one job may "
        "use, e.g. 7 on a shared card; the plan sizes micro-batches to it",
    )
    p_worker.set_defaults(func=worker)
    p_demo = sub.add_parser("demo", help="build, train, serve and analyze in one command")
    p_demo.add_argument("--data-dir", dest="data_dir")
    p_demo.set_defaults(func=demo)
    p_sample = sub.add_parser(
        "sample-data", help="write a sample database, instruction files and a labelled CSV in the user's formats"
    )
    p_sample.add_argument("dir", help="folder to write into (finance_analysis_sample.db and seed/)")
    p_sample.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the same seed writes the same files")
    p_sample.set_defaults(func=sample_data)
    add_commands(sub)
    args = parser.parse_args(argv)
    logs.configure(json_lines=False)  # serve and worker switch to JSON lines when FLASHTUNE_LOG_JSON says so
    args.func(args)


if __name__ == "__main__":
    main()
