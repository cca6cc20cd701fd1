"""Fixtures that start real ``flashtune serve`` and ``flashtune worker`` processes on loopback.

Every service gets its own temporary DATA_DIR and database. The built-in base model is built once per test
session and copied into each DATA_DIR (it is deterministic, so this is what a fresh build would produce).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import Engine

from service.datasets.sample import SampleData, write_sample_data

if TYPE_CHECKING:
    from workers.training.spec import TrainingSpec

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("FLASHTUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def builtin_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session, or once per machine where FLASHTUNE_TEST_MODEL_CACHE names a folder to keep it in
    (the build is deterministic and locked across processes, so parallel test runs may share it)."""
    from service.llm.builtin.model import ensure_builtin_model

    shared = os.environ.get("FLASHTUNE_TEST_MODEL_CACHE")
    return ensure_builtin_model(Path(shared) if shared else tmp_path_factory.mktemp("builtin-cache"))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    """The project's own files in the user's formats (a SQLite database, instruction JSONL, a labelled CSV),
    written once per session: tests never read data from outside the repository."""
    return write_sample_data(tmp_path_factory.mktemp("sample-data"))


def seed_builtin(data_dir: Path, cache: Path) -> None:
    target = data_dir / "models" / cache.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cache, target)


class Service:
    """One API process and any number of worker processes sharing a DATA_DIR and database."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "FLASHTUNE_DATA_DIR": str(data_dir),
            "FLASHTUNE_PORT": str(self.port),
            "FLASHTUNE_HEARTBEAT_SECONDS": "0.5",
            "FLASHTUNE_POLL_SECONDS": "0.2",
            "FLASHTUNE_PROGRESS_INTERVAL_SECONDS": "0.3",
            "FLASHTUNE_LEASE_SECONDS": "10",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        }
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.data_dir / log_name).open("ab")
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=self.env, stdout=log, stderr=log)

    def start_api(self, *extra: str, log_level: str = "warning") -> None:
        self.api = self._spawn(["serve", "--log-level", log_level, *extra], "api.log")
        deadline = time.monotonic() + 180  # a loaded 2-core machine imports torch and transformers slowly
        while time.monotonic() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.api.poll() is None, self.logs()
            time.sleep(0.2)
        raise AssertionError("API did not start\n" + self.logs())

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        proc = self._spawn(["worker", *extra], f"worker-{len(self.workers)}.log")
        self.workers.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.data_dir.glob("*.log"))

    def post_job(self, **body: Any) -> dict[str, Any]:
        body.setdefault("dataset", "builtin")
        response = self.client.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def job(self, job_id: int) -> dict[str, Any]:
        response = self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, f"{response.status_code} {response.text}\n{self.logs()}"
        return dict(response.json())

    def wait(
        self, job_id: int, statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"), timeout: float = 900
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['status']}\n{self.logs()}")

    def stop(self) -> None:
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.client.close()


def wait_for(predicate: Any, timeout: float = 600, what: str = "condition", svc: Service | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail with the services' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{svc.logs() if svc else ''}")


def make_service(tmp: Path, cache: Path, workers: int = 1, env: dict[str, str] | None = None) -> Service:
    seed_builtin(tmp, cache)
    service = Service(tmp, env)
    service.start_api()
    for _ in range(workers):
        service.start_worker()
    return service


@pytest.fixture
def service(tmp_path: Path, builtin_model_cache: Path) -> Iterator[Service]:
    """A fresh API and one worker, with their own DATA_DIR and SQLite database."""
    svc = make_service(tmp_path, builtin_model_cache)
    yield svc
    svc.stop()


# ------------------------------------------------------------------------------ files tests load or upload
class PeftStandIn:
    """Stands in for a PEFT model where only its saving matters (checkpoints, publishing): ``save_pretrained``
    writes the weights and the config, as peft does."""

    def __init__(self) -> None:
        import torch

        self.layer = torch.nn.Linear(2, 2)

    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"weights")
        (Path(path) / "adapter_config.json").write_text('{"base_model_name_or_path": "/data/models/builtin-v1"}')


def hub_snapshot(cache: Path, repo: str, model: Path) -> Path:
    """``model``'s files as the snapshot of ``repo`` in the hub cache ``cache``, laid out as huggingface_hub lays it
    out (``models--org--name/refs/main`` naming ``snapshots/<revision>``)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    shutil.copytree(model, folder / "snapshots" / "0123abcd")
    return folder / "snapshots" / "0123abcd"


def shared_event_id_database(path: Path, rows: int) -> Path:
    """The finance import's join attack (a 106 KB file): ``rows`` events and ``rows`` impacts that all share one
    event_id, no keys declared, so a naive join makes ``rows`` x ``rows`` rows."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE events (event_id, source, ts_utc, content, star, name, previous, consensus, actual)")
        conn.execute("CREATE TABLE event_impacts (event_id, ticker, window_min, ret)")
        conn.executemany("INSERT INTO events VALUES ('e1', 'flash', '2025-01-01', '金价', 3, 0, 0, 0, 0)", [()] * rows)
        conn.executemany("INSERT INTO event_impacts VALUES ('e1', 'XAUUSD', 15, 0.001)", [()] * rows)
        conn.commit()
    return path


# ------------------------------------------------------------------------------ job-store databases (no processes)
def read_only_sqlite_url(tmp_path: Path) -> str:
    """An SQLite file in rollback-journal mode, opened read-only: SQLite cannot switch it to WAL."""
    path = tmp_path / "readonly.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    return f"sqlite:///file:{path}?mode=ro&uri=true"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh job database: an SQLite file, then a PostgreSQL database of its own (tests/pgdb.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        from tests.pgdb import postgres_database

        with postgres_database() as url:
            yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """The job tables created in ``db_url``."""
    from service.jobs.db import init_db, make_engine

    engine = make_engine(db_url)
    init_db(engine)
    yield engine
    engine.dispose()


# ------------------------------------------------------------------------------ in-process training runs
def builtin_spec(
    root: Path,
    model: Path,
    *,
    name: str = "job-1",
    train: int = 16,
    validation: int = 6,
    checkpoint_every: int = 2,
    **hyperparameters: object,
) -> TrainingSpec:
    """A training run on the first ``train`` built-in examples (``validation`` held-out ones) of the built-in model
    at ``model``: job folder ``root/name``, adapter ``root/adapters/name``; ``hyperparameters`` over 1 epoch."""
    from service.jobs.hyperparameters import Hyperparameters, resolve
    from service.llm.builtin.data import builtin_dataset
    from workers.training.spec import TrainingSpec

    train_set, held_out = builtin_dataset()
    return TrainingSpec(
        job_id=1,
        base_model="builtin",
        base_source=str(model),
        dataset="builtin",
        dataset_sha256=None,
        train=train_set[:train],
        validation=held_out[:validation],
        hp=resolve(Hyperparameters.model_validate({"epochs": 1, **hyperparameters}), "builtin"),
        job_dir=root / name,
        adapter_dir=root / "adapters" / name,
        checkpoint_every=checkpoint_every,
    )
