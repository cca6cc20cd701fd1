"""What one training run is given and how it talks back: ``TrainingSpec``, ``CudaOptions``, ``Hooks`` and the
run's two ways of ending early (``Interrupted``, ``TrainingError``).

They live apart from the recipe (``workers.training.recipe``) so that everything around it - the job's child process
(``workers.child``), the ranks of a multi-GPU job (``workers.training.distributed``), the fault plugins of the tests
(``workers.testing``) and the benchmarks (``bench/``) - can name them without importing the recipe, and the recipe
can import them without a cycle. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.jobs.hyperparameters import ResolvedHyperparameters
from service.jobs.models import Progress
from service.llm.base_cache import BaseCache
from service.llm.prompts import Example

DEVICES = ("auto", "cpu", "cuda")


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint; the job can resume from it."""


class TrainingError(Exception):
    """A final failure caused by the job's input; ``hint`` says what to change."""

    def __init__(self, message: str, hint: str | None = None, type: str = "training_error") -> None:
        super().__init__(message)
        self.hint = hint
        self.type = type


# What ``Hooks.fence`` is: given the write's name, a context to write in.
Fence = Callable[[str], AbstractContextManager[None]]


def no_fence(action: str) -> AbstractContextManager[None]:
    """The fence of a run outside a job (tests, benchmarks): every write goes ahead."""
    return contextlib.nullcontext()


@dataclass
class Hooks:
    """How a run reports and is stopped: ``on_progress`` after every optimizer step (``force``: write it now, not
    throttled), ``on_event`` for the job's event log, ``should_stop`` asked after every step (the run then
    checkpoints and raises ``Interrupted``). A hook may raise: the run ends with that exception.

    ``fence(action)`` wraps each write that outlives the run's temporary files (``"checkpoint"``, ``"prune"``,
    ``"publish"``): the write happens inside it, or not at all when entering it raises (the job's worker uses it to
    let only the attempt that holds the job write: workers/child.py)."""

    on_progress: Callable[[Progress, bool], None] = lambda progress, force: None
    on_event: Callable[[str, str, dict[str, Any]], None] = lambda type, message, data: None
    should_stop: Callable[[], bool] = lambda: False
    fence: Fence = no_fence


@dataclass(frozen=True)
class CudaOptions:
    """Which pieces the CUDA path may use (``workers.training.cuda.plan``); each is still taken only where the plan
    finds it pays off. The defaults are the worker's; the GPU benchmark turns pieces off to measure what each is
    worth (``bench/train_gpu.py``).

    ``varlen``: torch's varlen attention where the GPU has it (else sdpa with the packed mask); ``fused_layers``:
    Liger's RMSNorm/RoPE/SwiGLU kernels; ``keep_dequantized``: each NF4 weight dequantised once for the job where
    memory allows; ``graphs``: the decoder layers as CUDA graphs; ``row_multiple``: sdpa and graphed rows are padded
    to one length per job (the longest step), rounded up to this many tokens: a multiple of 64 keeps the matrix
    shapes tensor-core friendly, and the balanced steps (``workers.training.steps``) leave little to round.
    """

    varlen: bool = True
    fused_layers: bool = True
    keep_dequantized: bool = True
    graphs: bool = True
    row_multiple: int = 64

    def __post_init__(self) -> None:
        if self.row_multiple < 1:
            raise ValueError(f"row_multiple must be at least 1, not {self.row_multiple}")


@dataclass
class TrainingSpec:
    """One run: the base model, the examples, the resolved recipe and where to write. The job's child process builds
    it from the job's row (``workers.child``); tests and benchmarks build it directly."""

    job_id: int
    base_model: str  # the name the user gave
    base_source: str  # what from_pretrained gets
    dataset: str
    dataset_sha256: str | None
    train: list[Example]
    validation: list[Example]
    hp: ResolvedHyperparameters
    job_dir: Path  # checkpoints (service.core.layout)
    adapter_dir: Path  # where the adapter is published
    device: str = "auto"
    checkpoint_every: int = 50
    token_cache_dir: Path | None = (
        None  # tokenised rows cached per dataset and tokenizer (workers.training.token_cache)
    )
    gpu_memory_gib: float | None = None  # CUDA: memory the job may use (FLASHTUNE_GPU_MEMORY_GIB); None: all free
    compute_dtype: str = "auto"  # CUDA: FLASHTUNE_COMPUTE_DTYPE (service.llm.modeling.pick_compute_dtype)
    cuda_capability: str = ""  # CUDA: plan as on this compute capability (FLASHTUNE_CUDA_CAPABILITY); "": the GPU's
    cuda: CudaOptions = field(default_factory=CudaOptions)
    extra_info: dict[str, Any] = field(default_factory=dict)  # merged into training_info.json
    # a promotion's incumbent (name, folder): the adapter the job's alias points at, scored on the same held-out
    # items (workers/training/incumbent.py) so that the job is promoted only if it beats it (service/jobs/aliases.py)
    compare_with: tuple[str, Path] | None = None
    # quantised bases kept between jobs (service/llm/base_cache.py, FLASHTUNE_BASE_CACHE_GIB); None: not looked at
    base_cache: BaseCache | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not {self.device!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 step, not {self.checkpoint_every}")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError(f"gpu_memory_gib must be positive, not {self.gpu_memory_gib}")


# A fault plugin (tests only, ``FLASHTUNE_FAULTS=module:attribute``, loaded once per job process by workers.child):
# given a run's hooks, its spec and the rank, it returns the hooks to train with, e.g. ones that raise at a chosen
# step (workers/testing.py).
FaultPlugin = Callable[[Hooks, TrainingSpec, int], Hooks]
