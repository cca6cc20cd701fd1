"""``flashtune``: the composition root. ``serve | worker | demo | sample-data`` here; the client commands ``jobs |
datasets | adapters | workers | analyze`` in ``service.cli_client``. Built on typer (rich help and tables).

A bad setting, from a ``FLASHTUNE_*`` variable or a flag, is one line per setting naming it, and exit 1; never a
pydantic traceback.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.cli_client import register
from service.cli_client.follow import follow, report_end
from service.cli_client.http import Api
from service.cli_client.output import fail
from service.core import logs
from service.core.config import ENV_PREFIX, Settings, warn_unknown_env
from service.datasets.sample import DEFAULT_SEED, write_sample_data

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
log = logging.getLogger("flashtune")

app = typer.Typer(
    name="flashtune",
    help="Fine-tune LLMs on financial flash news and serve the adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version() -> str:
    try:
        return metadata.version("flashtune")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"flashtune {version()}")
        raise typer.Exit()


@app.callback()
def root(
    _version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune LLMs on financial flash news with (Q)LoRA and serve the adapters for analysis."""


# ---------------------------------------------------------------------------------------------------- settings
def settings_errors(exc: ValidationError | SettingsError, flags: Mapping[str, Any]) -> list[str]:
    """One line per bad setting, naming the flag it came from or else its ``FLASHTUNE_*`` variable."""

    def source(field: str) -> str:
        return "--" + field.replace("_", "-") if field in flags else ENV_PREFIX + field.upper()

    if isinstance(exc, SettingsError):  # a complex value (a JSON list) that does not even parse
        match = re.search(r'field "(\w+)"', str(exc))
        name = source(match.group(1)) if match else "a FLASHTUNE_* variable"
        return [f"invalid {name}: {exc.__cause__ or exc}"]
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        value = repr(error.get("input"))
        value = value if len(value) <= 60 else value[:57] + "..."
        lines.append(f"invalid {source(field)}={value}: {error['msg']}")
    return lines


def _settings(*, log_json: bool = False, **flags: Any) -> Settings:
    """The settings of ``serve`` and ``worker``: flags (a setting's name and value, None where not given) over
    ``FLASHTUNE_*`` over defaults; a bad value exits 1 with one line naming it; unknown ``FLASHTUNE_*`` names are
    warned about."""
    overrides = {name: value for name, value in flags.items() if value is not None}
    if log_json:
        overrides["log_json"] = True
    try:
        settings = Settings(**overrides)
    except (ValidationError, SettingsError) as exc:
        fail("\nerror: ".join(settings_errors(exc, overrides)))  # one line for each bad setting
    if settings.log_json:
        logs.configure(json_lines=True)
    warn_unknown_env(os.environ)  # a mistyped FLASHTUNE_* name would be ignored without a word
    return settings


def require_data_dir(settings: Settings) -> None:
    """Exit 1 with one line, not a traceback, when DATA_DIR cannot be used: its folders cannot be made or it cannot be
    written (read-only, not a folder, no permission, disk full)."""
    probe = settings.data_dir / f".write-test-{os.getpid()}"
    try:
        settings.ensure_dirs()
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        fail(f"FLASHTUNE_DATA_DIR={settings.data_dir} cannot be used: {exc.strerror or type(exc).__name__}")


# The flags of serve and worker. A setting's flag is None unless given, and names the FLASHTUNE_* variable it
# overrides; the first five are both commands' (demo takes --data-dir too).
DataDir = Annotated[Path | None, typer.Option(help="FLASHTUNE_DATA_DIR", show_default=False)]
DatabaseUrl = Annotated[str | None, typer.Option(help="FLASHTUNE_DATABASE_URL", show_default=False)]
BaseModel = Annotated[str | None, typer.Option(help="FLASHTUNE_BASE_MODEL", show_default=False)]
Device = Annotated[Literal["auto", "cpu", "cuda"] | None, typer.Option(help="FLASHTUNE_DEVICE", show_default=False)]
LogJson = Annotated[bool, typer.Option("--log-json", help="FLASHTUNE_LOG_JSON: one JSON object per log line.")]
Host = Annotated[str | None, typer.Option(help="FLASHTUNE_HOST (default 127.0.0.1)", show_default=False)]
Port = Annotated[int | None, typer.Option(help="FLASHTUNE_PORT (default 8000)", show_default=False)]
AllowPublic = Annotated[bool, typer.Option("--allow-public", help="Listen beyond loopback without an API key.")]
LogLevel = Annotated[str, typer.Option(help="uvicorn's: critical, error, warning, info, debug.")]
MaxJobs = Annotated[int | None, typer.Option(help="Exit after this many jobs.", min=1)]
Gpus = Annotated[
    str | None,
    typer.Option(help="FLASHTUNE_GPUS: GPUs one job trains on, a number or 'all' (torchrun; on CPU, gloo)."),
]
Gpu = Annotated[str | None, typer.Option(help="FLASHTUNE_GPU: CUDA_VISIBLE_DEVICES of this worker's jobs, e.g. 0.")]
GpuMemoryGib = Annotated[
    float | None, typer.Option(help="FLASHTUNE_GPU_MEMORY_GIB: GPU memory one job may use, e.g. 7.")
]


# ----------------------------------------------------------------------------------------------- serve, worker
@app.command()
def serve(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    base_model: BaseModel = None,
    device: Device = None,
    log_json: LogJson = False,
    host: Host = None,
    port: Port = None,
    allow_public: AllowPublic = False,
    log_level: LogLevel = "info",
) -> None:
    """Start the API. Jobs, datasets, adapters, /analyze, /v1 and the dashboard."""
    import uvicorn

    from service.api.main import create_app

    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        base_model=base_model,
        device=device,
        log_json=log_json,
        host=host,
        port=port,
    )
    require_data_dir(settings)
    if settings.api_key_file is not None:
        from service.api.security import ApiKeyConfigError, api_keys

        try:
            api_keys(settings)
        except ApiKeyConfigError as exc:
            fail(str(exc))
    if not settings.auth_enabled:
        if settings.host not in LOOPBACK and not allow_public:
            fail(f"refusing to listen on {settings.host} without FLASHTUNE_API_KEY; set a key or pass --allow-public")
        log.warning("no FLASHTUNE_API_KEY set: the API is open to anyone who can reach it")
    log.info("data in %s; database %s", settings.data_dir, _shown_url(settings.resolved_database_url))
    # JSON lines: log_config=None keeps the set-up of logs.configure instead of uvicorn's own formatters
    logging_options: dict[str, Any] = {"log_config": None} if settings.log_json else {}
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level, **logging_options)


def _shown_url(url: str) -> str:
    """A database URL without its password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@app.command()
def worker(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    base_model: BaseModel = None,
    device: Device = None,
    log_json: LogJson = False,
    max_jobs: MaxJobs = None,
    gpus: Gpus = None,
    gpu: Gpu = None,
    gpu_memory_gib: GpuMemoryGib = None,
) -> None:
    """Start a worker. It trains queued jobs; run any number sharing the database and DATA_DIR."""
    from service.jobs.db import DatabaseError
    from workers.worker import Worker

    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        base_model=base_model,
        device=device,
        log_json=log_json,
        gpus=gpus,
        gpu=gpu,
        gpu_memory_gib=gpu_memory_gib,
    )
    require_data_dir(settings)
    log.info("data in %s", settings.data_dir)
    try:
        Worker(settings).run(max_jobs=max_jobs)
    except DatabaseError as exc:
        fail(str(exc))


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


def _wait_healthy(api: Api, procs: list[subprocess.Popen[bytes]], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            fail("the API or the worker exited while starting (see its log above)")
        try:
            if api.client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    fail(f"the API did not come up at {api.url} in {seconds:.0f} s")


def _demo_compare(api: Api, adapter: str) -> None:
    for text in DEMO_NEWS:
        before = api.call("POST", "/analyze", json={"text": text, "adapter": "none", "max_new_tokens": 0})
        after = api.call("POST", "/analyze", json={"text": text, "adapter": adapter})
        typer.echo(f"news: {text}")
        typer.echo(f"  base model : {before['label']:<8} p={before['score']:.2f}")
        typer.echo(f"  fine-tuned : {after['label']:<8} p={after['score']:.2f}  {after['analysis']}")
    metrics = api.get(f"/adapters/{adapter}")["metrics"]
    if metrics.get("adapter"):
        typer.echo(
            f"\nheld-out accuracy: base {metrics['base']['accuracy']:.2f} -> adapter "
            f"{metrics['adapter']['accuracy']:.2f} ({metrics['num_labelled']} items)"
        )


@app.command()
def demo(data_dir: DataDir = None) -> None:
    """Train and analyze on the built-in model. Build, train, serve, analyze: about a minute."""
    folder = data_dir or os.environ.get("FLASHTUNE_DATA_DIR") or tempfile.mkdtemp(prefix="flashtune-demo-")
    port = _free_port()
    env = {**os.environ, "FLASHTUNE_DATA_DIR": str(folder), "FLASHTUNE_PORT": str(port)}
    typer.echo(f"FlashTune demo: data in {folder}, API on http://127.0.0.1:{port}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the API and the worker on the way out too
    procs = [
        subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], env=env),
        subprocess.Popen([sys.executable, "-m", "workers"], env=env),
    ]
    try:
        with Api(f"http://127.0.0.1:{port}", None, timeout=300) as api:
            _wait_healthy(api, procs)
            job = api.call("POST", "/jobs", json={"dataset": "builtin"})
            typer.echo(f"queued job {job['id']} (the built-in model is built on first use, then trained)")
            job = follow(api, job["id"])
            if report_end(job):
                raise typer.Exit(1)
            typer.echo("")
            _demo_compare(api, job["adapter"])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


@app.command("sample-data")
def sample_data(
    folder: Annotated[
        Path, typer.Argument(metavar="DIR", help="Folder to write into (finance_analysis_sample.db, seed/).")
    ],
    seed: Annotated[int, typer.Option(help="The same seed writes the same files.")] = DEFAULT_SEED,
) -> None:
    """Write sample data files. A database, instruction JSONL and a CSV in the user's formats."""
    try:
        written = write_sample_data(folder, seed=seed)
    except OSError as exc:
        fail(f"cannot write sample data into {folder}: {exc.strerror or exc}")
    for path in written.files():
        typer.echo(str(path))


register(app)  # the client commands, listed after these


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    """The ``flashtune`` entry point (``python -m service`` and ``python -m workers`` call it with their command)."""
    logs.configure(json_lines=False)  # serve and worker switch to JSON lines when FLASHTUNE_LOG_JSON says so
    # rich help and usage errors on a terminal; click's plain lines in logs and pipes (no boxes, no wrapping)
    app.rich_markup_mode = "rich" if sys.stderr.isatty() else None
    app(args=list(argv) if argv is not None else None, prog_name="flashtune")


if __name__ == "__main__":
    main()
