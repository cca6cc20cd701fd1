"""All settings, read once from the environment (prefix ``FLASHTUNE_``).

A ``FLASHTUNE_*`` variable that names no setting would be ignored without a word (a typo such as
``FLASHTUNE_GPU_MEMORY_GB`` trains with the default): ``warn_unknown_env`` reports each one when ``flashtune serve`` or
``flashtune worker`` starts, with the closest known name.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.layout import Layout

ENV_PREFIX = "FLASHTUNE_"
# FLASHTUNE_* variables that are not settings of this class but are read elsewhere: the one allow-list of
# ``unknown_env_names``.
OTHER_ENV_NAMES = frozenset(
    {
        "FLASHTUNE_URL",  # the server of the client commands (service/cli_client.py)
        "FLASHTUNE_TORCH_VERSION",  # the torch that scripts/install.sh installs
        "FLASHTUNE_PUBLISH",  # compose.yaml: where the API port is published
        "FLASHTUNE_WORKER_GPU",  # compose.yaml: the GPU of each worker container
        "FLASHTUNE_WORKER_2_GPU",
        "FLASHTUNE_GPU_PUBLISH",  # compose.yaml: where the GPU API's port is published
        "FLASHTUNE_API_GPU",  # compose.yaml: the GPU of the GPU API's container
        "FLASHTUNE_TORCH_INDEX_URL",  # the index scripts/install.sh installs torch from
        "FLASHTUNE_TEST_POSTGRES",  # the test harness: the PostgreSQL server of the tests (tests/conftest.py)
        "FLASHTUNE_TEST_MODEL_CACHE",  # the test harness: one built-in model build for all runs (tests/conftest.py)
    }
)


def default_data_dir() -> Path:
    """``FLASHTUNE_DATA_DIR`` when unset: ``$XDG_DATA_HOME/flashtune``, else ``~/.local/share/flashtune``."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    try:
        root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    except RuntimeError:  # no home directory to be found: the current one, as before
        return Path("flashtune-data").absolute()
    return root / "flashtune"


class Settings(BaseSettings):
    # An empty variable is an unset one: compose passes ${NAME:-} for settings the operator may leave out.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Everything the service writes. Default: one folder per user ($XDG_DATA_HOME/flashtune, else "
        "~/.local/share/flashtune), whatever the current directory, so serve and worker find the same database",
    )
    database_url: str = Field(default="", description="Default: SQLite file in DATA_DIR.")
    base_model: str = Field(default="builtin", description="'builtin', a hub id or a local path.")
    api_key: str | None = None
    api_key_file: Path | None = Field(default=None, description="More keys: one per line, '#' comments.")
    allowed_model_roots: list[Path] = Field(
        default_factory=list, description="Where local base models may live (JSON list); default DATA_DIR/models."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    host: str = "127.0.0.1"
    port: int = 8000
    log_json: bool = Field(default=False, description="one JSON object per log line (service/core/logs.py)")
    dashboard: bool = Field(default=True, description="the web dashboard at /ui (service/static)")

    # Queue and worker
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 2.0
    poll_seconds: float = 1.0
    max_attempts: int = 3
    gpus: str = Field(
        default="1",
        pattern=r"^(all|[1-9][0-9]*)$",
        description="GPUs one job trains on: a number "
        "or 'all'; more than 1 runs the job through torchrun (NCCL on CUDA; gloo processes on CPU)",
    )
    gpu: str | None = Field(
        default=None,
        description="CUDA_VISIBLE_DEVICES of this worker's jobs, e.g. '0' or "
        "'0,1': one worker per GPU is the other way to use several GPUs",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="GPU memory one training job may use "
        "(e.g. 7 to share a card or to fit a 16 GB one); default: all that is free",
    )
    job_process_start: Literal["forkserver", "spawn"] = Field(
        default="forkserver",
        description="how each job's training process starts: forked from a server that has "
        "imported torch and transformers once (workers/preload.py), or as a fresh interpreter ('spawn')",
    )
    base_cache_gib: float = Field(
        default=0.0,
        ge=0,
        description="disk kept for bases quantised by earlier jobs (DATA_DIR/cache/bases, ~4.5 GiB for a 7B base "
        "in NF4), so that the next job on the same base loads it without quantising; least recently used entries "
        "go first; 0 (the default): off, since on a host whose page cache holds the checkpoint it saves under a "
        "second and costs the first job ~10 s (docs/benchmarks.md, session 12; service/llm/base_cache.py)",
    )
    progress_interval_seconds: float = 1.0
    checkpoint_every_steps: int = 50
    faults: str = Field(
        default="",
        pattern=r"^([\w.]+:\w+)?$",
        description="tests only: a fault plugin 'module:attribute' (workers/testing.py) that each job process "
        "wraps its training hooks with, e.g. to raise out-of-memory or fail a rank at a chosen step; empty: none",
    )

    # Serving
    default_adapter: str = Field(
        default="latest",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z][A-Za-z0-9._-]*$",
        description="what /analyze serves when a request names no adapter: 'latest' (the newest adapter with a "
        "held-out evaluation), an alias such as 'production', an adapter name, or 'none' (the base alone)",
    )
    max_loaded_adapters: int = Field(default=8, ge=1)
    batch_max_size: int = Field(default=32, ge=1, description="1 turns micro-batching off")
    batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="how long a micro-batch waits for company after its first request; requests "
        "that queue up while a pass runs share the next one anyway (0 measured faster on an H200: docs/benchmarks.md)",
    )
    max_batch_items: int = Field(default=64, ge=1, description="items in one POST /analyze/batch")
    serve_quantization: Literal["auto", "nf4", "none"] = Field(
        default="auto", description="the served base: auto = NF4 on CUDA, float32 on CPU; none = bf16 on CUDA"
    )
    serve_dense_nf4: bool = Field(
        default=True,
        description="on CUDA, an NF4 base keeps each weight's bf16 copy, dequantised once, when the "
        "copies take at most half the free GPU memory: no dequantising per pass, ~4x the NF4 weights' memory",
    )
    serve_merged: str = Field(
        default="",
        description="adapters served merged into an unquantised copy of the base: names, comma-separated, "
        "or 'all'; empty: none (every adapter attached to the one base)",
    )
    max_merged_models: int = Field(default=1, ge=1, description="merged copies kept in memory (each a whole model)")
    cuda_graph_scoring: bool = Field(
        default=True,
        description="on CUDA, label scoring replays CUDA graphs (one per prompt-length bucket, batch of 1, 2, "
        "4, 8, 16 or 32 rows up to batch_max_size, and adapter; captured between requests, never by one)",
    )
    cuda_graph_decoding: bool = Field(
        default=True,
        description="on CUDA, generation decodes greedily with a static KV cache and each step "
        "replayed from a CUDA graph (per batch size and cache length, and per adapter on the attached base; captured "
        "on first use in a few eager steps); mixed-adapter batches decode with generate()",
    )
    fused_kernels: bool = Field(
        default=True,
        description="on CUDA, served Llama-family models use Liger's fused RMSNorm, RoPE and SwiGLU "
        "kernels (where liger-kernel is installed)",
    )
    serve_gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="GPU memory the API's models may use (the served base, dense NF4 copies, merged copies, "
        "decoding caches), held to it like a training job to GPU_MEMORY_GIB; default: all that is free",
    )

    # CUDA compute (training and serving alike; service/llm/modeling.py)
    compute_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: bf16 where the GPU has it natively (sm80+), else fp16 with dynamic loss scaling "
        "(T4, V100); or force one",
    )
    cuda_capability: str = Field(
        default="",
        pattern=r"^([1-9][0-9]?\.[0-9])?$",
        description="plan the CUDA path as on a GPU of this compute capability, e.g. 7.5 (T4): fp16 under "
        "compute_dtype auto and no flash-attention varlen kernel; for trying a pre-Ampere path on a newer card. "
        "Empty: the GPU's own",
    )

    # Limits
    max_upload_bytes: int = 200 * 1024 * 1024
    max_text_chars: int = 4000
    max_new_tokens_limit: int = 256
    max_chat_chars: int = Field(
        default=16_000, ge=1, description="all messages and guided_choice strings of one chat completion together"
    )
    max_chat_prompt_tokens: int = Field(
        default=2048, ge=64, description="the prompt a chat completion shows the model (its input clipped to fit)"
    )
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, description="JSON bodies of every other route")
    max_analyze_body_bytes: int = Field(default=64 * 1024, ge=1024, description="POST /analyze bodies")
    analyze_rate_limit_per_minute: float = Field(default=0, ge=0, description="per key or client address; 0: off")
    analyze_rate_limit_burst: int = Field(default=10, ge=1)
    max_queued_jobs: int = Field(default=1000, ge=1, description="queued jobs at once; more is 429 queue_full")
    max_dataset_examples: int = Field(
        default=1_000_000, ge=1, description="examples (lines, rows, events) in one upload; more is a 422"
    )
    import_max_rows: int = Field(
        default=500_000, ge=1, description="rows the finance SQLite import may read (events x event_impacts)"
    )
    import_seconds: float = Field(default=120.0, gt=0, description="how long one finance SQLite import may run")
    gathered_lora: bool = Field(
        default=True,
        description="a micro-batch mixing attached adapters runs all their LoRA deltas in one gathered, batched "
        "computation per layer (weights stacked once per set of loaded adapters; service/serving/gathered_lora.py); "
        "false: peft's loop, once per distinct adapter",
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        """``~`` expanded, and absolute: the folder the logs name is the one used."""
        return value.expanduser().absolute()

    @property
    def layout(self) -> Layout:
        """Where everything under DATA_DIR lives (service/core/layout.py)."""
        return Layout(self.data_dir)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.layout.database_file.resolve()}"

    def ensure_dirs(self) -> None:
        self.layout.ensure()

    def serves_merged(self, adapter: str) -> bool:
        names = {n.strip() for n in self.serve_merged.split(",") if n.strip()}
        return "all" in names or adapter in names

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key) or self.api_key_file is not None

    @property
    def model_roots(self) -> list[Path]:
        return self.allowed_model_roots or [self.layout.models]


@lru_cache
def get_settings() -> Settings:
    return Settings()


def known_env_names() -> frozenset[str]:
    """Every ``FLASHTUNE_*`` name something reads: one per setting, and the allow-list ``OTHER_ENV_NAMES``."""
    return frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields) | OTHER_ENV_NAMES


def unknown_env_names(environ: Mapping[str, str]) -> list[str]:
    """The ``FLASHTUNE_*`` names in ``environ`` that nothing reads, sorted (the prefix and the names match in any
    case, as pydantic-settings matches them)."""
    known = known_env_names()
    return sorted(name for name in environ if name.upper().startswith(ENV_PREFIX) and name.upper() not in known)


def warn_unknown_env(environ: Mapping[str, str]) -> list[str]:
    """Log a warning for each unknown ``FLASHTUNE_*`` variable, naming the closest known one; returns the lines."""
    known = sorted(name.removeprefix(ENV_PREFIX) for name in known_env_names())  # the prefix would match them all
    lines = []
    for name in unknown_env_names(environ):
        closest = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), known, n=1)
        hint = f" (did you mean {ENV_PREFIX}{closest[0]}?)" if closest else ""
        lines.append(f"unknown environment variable {name} is ignored{hint}")
        logging.getLogger("flashtune.config").warning(lines[-1])
    return lines
