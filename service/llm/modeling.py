"""Loading a base model the same way for training and serving: built-in, hub id or local path.

On CUDA the base is loaded in 4-bit NF4 with double quantisation (QLoRA) unless the job asks for
``quantization: "none"``; elsewhere it is loaded unquantised in float32, because bitsandbytes' 4-bit kernels need a
GPU. ``plan_load`` says which and why, for the job's ``setup`` event.

The compute dtype on CUDA (``pick_compute_dtype``) is bf16 where the card has it natively (Ampere, sm80, and newer)
and fp16 elsewhere (T4 sm75, V100 sm70: no bf16 tensor cores, bf16 would run emulated or not at all): activations,
the NF4 compute dtype and the unquantised modules (embeddings, norms, head) then are fp16, the LoRA weights stay
float32 and training scales its loss dynamically (``workers.training.cuda.plan``). ``FLASHTUNE_COMPUTE_DTYPE``
overrides the choice; ``FLASHTUNE_CUDA_CAPABILITY`` (e.g. ``7.5``) plans as on another card, so the T4 path can be
run on a newer GPU. Training and serving load through the same plan.

bitsandbytes is never imported off CUDA (``plan_load`` hides it from peft, which would import it): on a CPU it
cannot run 4-bit layers, and importing it there looks for kernels on the Hub and logs warnings.

Where a name leads (``resolve_base_model``): ``builtin`` to the built-in model in ``DATA_DIR/models``; a hub id
``org/name`` only ever to its snapshot in the hub cache (``HF_HOME``), never to a folder of that name relative to
the process's working directory; a local path only to a folder inside an allowed model root (or the operator's own
``FLASHTUNE_BASE_MODEL``). A load that fails says so in generic words (``ModelLoadError``: no path, nothing about
which folders exist); the detail goes to the process's log for the operator.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from service.core.config import Settings
from service.llm.builtin.model import BUILTIN_NAME, builtin_path, ensure_builtin_model

log = logging.getLogger("flashtune.model")

_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")  # used with fullmatch: nothing before or after, not even a newline
BASE_MODEL_HINT = "use 'builtin', a hub id 'org/name', or a local model folder under an allowed model root"
LOAD_HINT = (
    "use 'builtin', a hub id whose files are in the server's hub cache (HF_HOME) or can be downloaded, or a model "
    "folder under an allowed model root; the server's log has the reason"
)
# What a hub snapshot needs for from_pretrained (config, safetensors weights, tokenizer files), and nothing else:
# no pickled weights, no code, no other formats of the same weights.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
HUB_SKIP = ["original/*", "consolidated*", "*/*"]


class ModelLoadError(Exception):
    """The base model cannot be found or loaded. ``str()`` is what an API caller may see: it names no path and
    says nothing about which folders exist; ``hint`` says what to change. The detail is logged where it is
    raised."""

    def __init__(self, message: str, hint: str = LOAD_HINT) -> None:
        super().__init__(message)
        self.hint = hint


def _load_failed(what: str, name: str, exc: BaseException) -> ModelLoadError:
    """Log the detail of a failed load for the operator; the error a caller sees names only the public name."""
    log.warning("cannot load the %s of base model %r: %s: %s", what, name, type(exc).__name__, exc)
    return ModelLoadError(f"the {what} of base model {public_base_name(name)!r} could not be loaded")


@dataclass(frozen=True)
class LoadPlan:
    device: str
    quantization: Literal["nf4", "none"]
    dtype: torch.dtype  # the compute dtype: activations, NF4 compute, unquantised modules
    reason: str

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def loss_scaling(self) -> bool:
        """fp16 training needs dynamic loss scaling (small gradients underflow in fp16)."""
        return self.dtype == torch.float16


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hub_id(name: str) -> bool:
    return HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def public_base_name(name: str) -> str:
    """How a base model is named outside the server (downloaded adapters, errors): ``builtin``, its hub id, or the
    folder name of a local model; never a path of the server's file system."""
    if name == BUILTIN_NAME or is_hub_id(name):
        return name
    path = Path(name)
    repo = path.parent.parent.name  # a hub snapshot: <cache>/models--org--name/snapshots/<commit>
    if path.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") == 2:
        return repo.removeprefix("models--").replace("--", "/")
    if path.parent.name == "models" and path.name.startswith(f"{BUILTIN_NAME}-v"):
        return BUILTIN_NAME  # service.llm.builtin.model.builtin_path
    return path.name or "base"


def name_base_publicly(adapter_dir: Path) -> None:
    """Put the base's public name where peft's ``save_pretrained`` wrote its folder (the server's path):
    ``adapter_config.json``'s ``base_model_name_or_path`` and ``README.md``'s ``base_model`` and tags. Done on the
    saved files, not on the model, so peft still finds the base's config locally instead of asking the hub."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    source = config.get("base_model_name_or_path")
    if not source:
        return
    public = public_base_name(source)
    config["base_model_name_or_path"] = public
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.write_text(readme.read_text(encoding="utf-8").replace(source, public), encoding="utf-8")


def resolve_base_model(name: str, settings: Settings) -> str:
    """The ``from_pretrained`` argument for a job's base model: always a folder, so transformers never looks a name
    up relative to the working directory. Raises ModelLoadError (generic message, detail logged)."""
    if name == BUILTIN_NAME:
        return str(ensure_builtin_model(settings.data_dir))
    if is_hub_id(name):
        return _hub_snapshot(name)
    if name == settings.base_model:  # the operator's own local folder: trusted as configured
        return name
    local = _inside_allowed_root(name, settings)
    if local is None:
        log.warning("base model %r is not a folder inside an allowed model root (any more)", name)
        raise ModelLoadError(f"base model {public_base_name(name)!r} could not be loaded")
    return str(local)


def _hub_snapshot(repo_id: str) -> str:
    """The folder of ``repo_id``'s snapshot in the hub cache (``HF_HOME``), downloaded there first unless
    ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(repo_id, allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP))
    except Exception as exc:  # not cached while offline, no such repository, gated, network: all mean "not loadable"
        raise _load_failed("files", repo_id, exc) from exc


class BaseModelRejected(ValueError):
    """A requested base model is neither built-in, a hub id, nor a folder under an allowed root."""


def _inside_allowed_root(name: str, settings: Settings) -> Path | None:
    """``name`` resolved (symlinks followed) when it is an absolute path to a folder strictly inside an allowed
    model root; else None."""
    if not name.startswith("/"):
        return None
    try:
        resolved = Path(name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, an unrepresentable path
        return None
    for root in settings.model_roots:
        try:
            root_resolved = root.resolve(strict=True)
        except OSError:
            continue
        if resolved != root_resolved and resolved.is_relative_to(root_resolved) and resolved.is_dir():
            return resolved
    return None


def validate_base_model(name: str, settings: Settings) -> str:
    """The base model a job may use, as stored on the job; raises BaseModelRejected otherwise.

    Accepted: ``builtin``, the server's own configured base model, a hub id ``org/name`` (loaded only from the hub
    cache, ``resolve_base_model``), or an absolute path that resolves (symlinks followed) to an existing folder
    inside one of ``settings.model_roots``; a local path is returned resolved, so what the worker loads is what was
    checked (and it checks again). Everything that could point elsewhere is refused: ``..`` segments,
    percent-encoded or backslash forms, ``~``, NUL and other control characters. The message never echoes the path
    or the roots, so a refusal tells nothing about the server's file system.
    """
    if name in (BUILTIN_NAME, settings.base_model):
        return name
    if any(ord(c) < 32 or c in "%\\~" for c in name) or ".." in name.split("/") or "\x7f" in name:
        raise BaseModelRejected(BASE_MODEL_HINT)
    if is_hub_id(name):
        return name
    local = _inside_allowed_root(name, settings)
    if local is None:
        raise BaseModelRejected(BASE_MODEL_HINT)
    return str(local)


def pick_device(setting: str) -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "FLASHTUNE_DEVICE=cuda but no CUDA device is visible; use 'auto' or 'cpu'", "check FLASHTUNE_DEVICE"
        )
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def cuda_capability(override: str = "") -> tuple[int, int]:
    """The compute capability the CUDA path is planned for: ``override`` (``FLASHTUNE_CUDA_CAPABILITY``, e.g.
    ``"7.5"``) where given, else the current card's."""
    if override:
        major, _, minor = override.partition(".")
        return int(major), int(minor or 0)
    card = torch.cuda.get_device_capability()
    return card[0], card[1]


def pick_compute_dtype(setting: str = "auto", capability: str = "") -> tuple[torch.dtype, str]:
    """The CUDA compute dtype and why: ``setting`` (``FLASHTUNE_COMPUTE_DTYPE``) unless ``auto``; else bf16 where the
    card has it natively (``torch.cuda.is_bf16_supported(including_emulation=False)``; with a ``capability``
    override: sm80 or newer), fp16 elsewhere."""
    if setting in COMPUTE_DTYPES:
        dtype = COMPUTE_DTYPES[setting]
        return dtype, f"{DTYPE_NAMES[dtype]} compute (FLASHTUNE_COMPUTE_DTYPE={setting})"
    if setting != "auto":
        raise ValueError(f"compute dtype must be auto, bfloat16 or float16, not {setting!r}")
    major, minor = cuda_capability(capability)
    card = f"sm{major}{minor}" + (" (FLASHTUNE_CUDA_CAPABILITY)" if capability else "")
    native = (major, minor) >= (8, 0) if capability else torch.cuda.is_bf16_supported(including_emulation=False)
    if native:
        return torch.bfloat16, f"bf16 compute (native on {card})"
    return torch.float16, f"fp16 compute ({card} has no native bf16)"


def plan_load(device: str, quantization: str, compute_dtype: str = "auto", capability: str = "") -> LoadPlan:
    """How to load the base on ``device``: NF4 or not, and in which dtype (``pick_compute_dtype`` on CUDA, float32
    elsewhere), with the reason the ``setup`` event shows."""
    if device == "cuda":
        dtype, why = pick_compute_dtype(compute_dtype, capability)
        scaled = ", float32 LoRA weights, dynamic loss scaling" if dtype == torch.float16 else ""
        if quantization == "none":
            return LoadPlan("cuda", "none", dtype, f"CUDA with quantization 'none': unquantised base, {why}{scaled}")
        return LoadPlan("cuda", "nf4", dtype, f"CUDA available: 4-bit NF4 base (QLoRA), {why}{scaled}")
    if quantization == "nf4":
        raise ModelLoadError(
            "quantization 'nf4' needs a CUDA GPU (bitsandbytes 4-bit); use 'auto' or 'none'", "change quantization"
        )
    keep_bitsandbytes_out()
    return LoadPlan("cpu", "none", torch.float32, "no CUDA device: plain LoRA on the unquantised float32 base")


def keep_bitsandbytes_out(modules: dict[str, Any] = sys.modules) -> bool:  # noqa: B006 - the process's own table
    """Make ``import bitsandbytes`` fail in this process (peft then treats it as absent), unless it is imported
    already; returns whether it is kept out. Called on the CPU path, where it cannot run: importing it there
    looks for kernels on the Hub and logs warnings in every job and server log."""
    if modules.get("bitsandbytes") is not None:
        return False
    modules["bitsandbytes"] = None  # type: ignore[assignment]  # how the import system spells "not importable"
    return True


GIB = 2**30
_memory_cap: list[int] = []  # bytes this process may hold on the GPU, once capped (cap_gpu_memory)


def cap_gpu_memory(cap_gib: float | None) -> None:
    """Hold this process to ``cap_gib`` of GPU memory (``FLASHTUNE_GPU_MEMORY_GIB`` for a training job,
    ``FLASHTUNE_SERVE_GPU_MEMORY_GIB`` for the API): beyond it torch raises out-of-memory, whatever the card has
    free. None: no cap."""
    if cap_gib is None:
        return
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(min(cap_gib * GIB / total, 1.0))
    _memory_cap[:] = [int(cap_gib * GIB)]


def free_gpu_bytes() -> int:
    """GPU memory this process can still take: free on the card plus its allocator's unused cache, within its cap."""
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if _memory_cap:
        free = min(free, _memory_cap[0] - torch.cuda.memory_allocated())
    return max(free, 0)


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _load_failed("tokenizer", source, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=8)
def has_chat_template(source: str) -> bool:
    """Whether the tokenizer of the base in folder ``source`` has a chat template, which ``prompt_format``
    ``chat_template`` renders every prompt through (service/llm/prompts.py). Read once per folder: the API asks it
    for a chat-format adapter or job, before anything is queued, and must not load a tokenizer on every request."""
    return getattr(load_tokenizer(source), "chat_template", None) is not None


def local_base_source(name: str, settings: Settings) -> str | None:
    """The folder of base model ``name`` where this host has it without building or downloading anything: the
    built-in model once built, a local folder (``resolve_base_model``); None for a hub id or an unbuilt built-in
    model, which only the worker that loads them can tell about."""
    if name == BUILTIN_NAME:
        path = builtin_path(settings.data_dir)
        return str(path) if (path / "config.json").exists() else None
    if is_hub_id(name):
        return None
    return resolve_base_model(name, settings)


def load_model(source: str, plan: LoadPlan) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": plan.dtype, "trust_remote_code": False}
    if plan.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=plan.dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # a multi-GPU rank has set its own device
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_failed("weights", source, exc) from exc
    if plan.quantization != "nf4":
        model.to(plan.device)  # type: ignore[arg-type]
    return model


def fuse_layers(model: Any) -> bool:
    """Swap in Liger's fused RMSNorm, RoPE and SwiGLU kernels where liger-kernel is installed, supports the model
    type and its Triton kernels build and run here (``liger_problem``; CUDA only). Liger also patches transformers'
    module for that model type, so later models of the type in this process get the kernels too."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    problem = liger_problem(model.dtype)
    if problem is not None:
        log.warning("Liger's fused kernels are off: %s", problem)
        return False
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True


@functools.cache
def liger_problem(dtype: torch.dtype) -> str | None:
    """None where Liger's kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) build and run on this GPU in
    ``dtype``, forward and backward, on tiny tensors; else why not (not installed, or a kernel that fails to warm
    up). Triton compiles a small C launcher with the machine's C compiler on first use: without one (or without
    Python's headers) every kernel fails, and the CUDA path then runs without them rather than not at all."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError as exc:
        return f"liger-kernel is not installed ({exc})"
    # Liger warns, on every model, that its optional CuTe-DSL and Ascend backends are missing; its Triton kernels
    # are the ones used here.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    try:
        _warm_liger(dtype, LigerRMSNorm, liger_rotary_pos_emb, LigerSwiGLUMLP, LigerFusedLinearCrossEntropyLoss)
    except Exception as exc:  # noqa: BLE001 - any failure means: run without them
        return f"a Liger kernel failed to warm up: {type(exc).__name__}: {str(exc).strip()[:300]}"
    return None


def _warm_liger(dtype: torch.dtype, norm: Any, rope: Any, mlp: Any, fused_ce: Any) -> None:
    """One forward and backward pass of each Liger kernel the CUDA path uses, on tiny tensors."""
    from types import SimpleNamespace

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    x = leaf(4, 64)
    norm(64).to("cuda", dtype)(x).sum().backward()
    q, k = leaf(1, 2, 4, 64), leaf(1, 2, 4, 64)
    cos, sin = torch.ones(1, 4, 64, device="cuda", dtype=dtype), torch.zeros(1, 4, 64, device="cuda", dtype=dtype)
    sum(t.float().sum() for t in rope(q, k, cos, sin)).backward()
    config = SimpleNamespace(hidden_size=64, intermediate_size=128, hidden_act="silu")
    mlp(config).to("cuda", dtype)(x).float().sum().backward()
    head = leaf(128, 64)
    fused_ce(reduction="sum")(head, leaf(4, 64), torch.tensor([1, 2, 3, -100], device="cuda")).backward()
    torch.cuda.synchronize()
