"""Loading a base model the same way for training and serving: built-in, hub id or local path.

On CUDA the base is loaded in 4-bit NF4 with double quantisation and bf16 compute (QLoRA) unless the job asks
for ``quantization: "none"``; elsewhere it is loaded unquantised in float32, because bitsandbytes' 4-bit
kernels need a GPU. ``describe_load`` says which and why, for the job's events.

Where a name leads (``resolve_base_model``): ``builtin`` to the built-in model in ``DATA_DIR/models``; a hub id
``org/name`` only ever to its snapshot in the hub cache (``HF_HOME``), never to a folder of that name relative to
the process's working directory; a local path only to a folder inside an allowed model root (or the operator's own
``FLASHTUNE_BASE_MODEL``). A load that fails says so in generic words (``ModelLoadError``: no path, nothing about
which folders exist); the detail goes to the process's log for the operator.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from service.core.config import Settings
from service.llm.builtin.model import BUILTIN_NAME, ensure_builtin_model

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
    dtype: torch.dtype
    reason: str


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


def plan_load(device: str, quantization: str) -> LoadPlan:
    if device == "cuda":
        if quantization == "none":
            return LoadPlan("cuda", "none", torch.bfloat16, "CUDA with quantization 'none': bf16 base, LoRA")
        return LoadPlan("cuda", "nf4", torch.bfloat16, "CUDA available: 4-bit NF4 base (QLoRA), bf16 compute")
    if quantization == "nf4":
        raise ModelLoadError(
            "quantization 'nf4' needs a CUDA GPU (bitsandbytes 4-bit); use 'auto' or 'none'", "change quantization"
        )
    return LoadPlan("cpu", "none", torch.float32, "no CUDA device: plain LoRA on the unquantised float32 base")


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _load_failed("tokenizer", source, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, plan: LoadPlan, public_name: str | None = None) -> Any:
    """The base model in ``source`` (a folder: ``resolve_base_model``), loaded as ``plan`` says and named
    ``public_name`` (default: ``public_base_name(source)``): an adapter saved on it records that name as its base
    (``adapter_config.json``, ``README.md``), never the server's path."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": plan.dtype, "trust_remote_code": False}
    if plan.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # a multi-GPU rank has set its own device
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_failed("weights", source, exc) from exc
    model.name_or_path = model.config.name_or_path = public_name or public_base_name(source)
    if plan.quantization != "nf4":
        model.to(plan.device)  # type: ignore[arg-type]
    return model


def fuse_layers(model: Any) -> bool:
    """Swap in Liger's fused RMSNorm, RoPE and SwiGLU kernels where liger-kernel is installed and supports the model
    type (CUDA only). Liger also patches transformers' module for that model type, so later models of the type in
    this process get the kernels too."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    # Liger warns, on every model, that its optional CuTe-DSL and Ascend backends are missing; its Triton kernels
    # are the ones used here.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True
