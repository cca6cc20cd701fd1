"""The DATA_DIR contract: where every file of the service lives, and how its names are made and read back.

Both processes use it: the worker writes a job's steps, checkpoints and adapter here; the API reads them back.
A name made here is parsed only here (``adapter_name`` / ``adapter_job_id``, ``checkpoint_name`` /
``checkpoint_step``), so the two sides cannot drift apart. Pure paths: no torch, no SQL.

    DATA_DIR/
      flashtune.db                      the default SQLite job table (service/jobs/db.py)
      datasets/<ds-id>/examples.jsonl   uploaded datasets (service/datasets/store.py)
      models/                           local base models (the default allowed root) and the built-in model
      jobs/<id>/steps.jsonl             each optimizer step's loss (service/jobs/loss_history.py)
      jobs/<id>/checkpoints/step-NNNNNNNN/   complete checkpoints (workers/training/checkpoints.py)
      adapters/job-<id>/                the published adapter with training_info.json
      cache/tokens/                     tokenised rows per dataset and tokenizer (workers/training/token_cache.py)
      cache/bases/<key>/                quantised bases kept between jobs (service/llm/base_cache.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STEPS_FILE = "steps.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "trainer_state.pt"  # written last into a checkpoint: its presence marks a complete one
# Used with fullmatch: ASCII digits only (\d would take '١'), written one way, nothing after (not even a newline)
_ADAPTER_NAME = re.compile(r"job-(0|[1-9][0-9]{0,17})")
_CHECKPOINT_NAME = re.compile(r"step-([0-9]{8,})")


def adapter_name(job_id: int) -> str:
    """The name of the adapter job ``job_id`` publishes."""
    return f"job-{job_id}"


def adapter_job_id(name: str) -> int | None:
    """The job that publishes adapter ``name``, or None when ``name`` is no adapter name."""
    match = _ADAPTER_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint folder holds."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path.name!r} is not a checkpoint folder name")
    return int(match.group(1))


def checkpoints_dir(job_dir: Path) -> Path:
    return job_dir / CHECKPOINTS


def complete_checkpoints(job_dir: Path) -> list[Path]:
    """A job's complete checkpoints, oldest first (a folder is complete once its trainer state is in it)."""
    root = checkpoints_dir(job_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and (p / CHECKPOINT_STATE).exists())


@dataclass(frozen=True)
class AdapterRef:
    """A published adapter: its name and its folder."""

    name: str
    path: Path


@dataclass(frozen=True)
class Layout:
    """The folders under one DATA_DIR."""

    data_dir: Path

    @property
    def database_file(self) -> Path:
        return self.data_dir / "flashtune.db"

    @property
    def datasets(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def models(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def adapters(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def token_cache(self) -> Path:
        return self.data_dir / "cache" / "tokens"

    @property
    def base_cache(self) -> Path:
        return self.data_dir / "cache" / "bases"

    def job_dir(self, job_id: int) -> Path:
        return self.jobs / str(job_id)

    def steps_file(self, job_id: int) -> Path:
        return self.job_dir(job_id) / STEPS_FILE

    def adapter_dir(self, name: str) -> Path:
        return self.adapters / name

    def adapter(self, name: str) -> AdapterRef:
        return AdapterRef(name, self.adapter_dir(name))

    def ensure(self) -> None:
        for folder in (self.datasets, self.jobs, self.adapters, self.models):
            folder.mkdir(parents=True, exist_ok=True)
